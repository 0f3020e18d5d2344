// RETURN_IF_ERROR / ASSIGN_OR_RETURN for absl::Status and absl::StatusOr (Debian's
// abseil 20220623 ships no status_macros.h). Defined once, here.
#pragma once

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MOEMESH_STATUS_CONCAT_INNER(a, b) a##b
#define MOEMESH_STATUS_CONCAT(a, b) MOEMESH_STATUS_CONCAT_INNER(a, b)

#define RETURN_IF_ERROR(expr)                          \
  do {                                                 \
    ::absl::Status moemesh_status_ = (expr);           \
    if (!moemesh_status_.ok()) return moemesh_status_; \
  } while (0)

#define ASSIGN_OR_RETURN(lhs, rexpr) \
  MOEMESH_ASSIGN_OR_RETURN_IMPL(MOEMESH_STATUS_CONCAT(moemesh_statusor_, __LINE__), lhs, rexpr)

#define MOEMESH_ASSIGN_OR_RETURN_IMPL(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                  \
  if (!statusor.ok()) return std::move(statusor).status();  \
  lhs = std::move(statusor).value()
