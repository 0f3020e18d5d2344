#include "services/runtime/flags.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>

#include "absl/status/status.h"

namespace moemesh {
namespace {

using std::chrono::milliseconds;
using ::testing::HasSubstr;

TEST(CliArgsTest, SecondsAreMillisecondsWithinTheirBounds) {
  const CliArgs args = CliArgs::Parse({"--lease-s", "0.25", "--low", "0.1", "--high", "3600",
                                       "--bad", "x", "--over", "3600.5"},
                                      {"lease-s", "low", "high", "bad", "over", "absent"})
                           .value();
  EXPECT_EQ(args.Seconds("lease-s", 3, 0.1, 3600).value(), milliseconds(250));
  EXPECT_EQ(args.Seconds("absent", 2.5, 0, 10).value(), milliseconds(2500));
  EXPECT_EQ(args.Seconds("low", 1, 0.1, 3600).value(), milliseconds(100));  // bounds included
  EXPECT_EQ(args.Seconds("high", 1, 0.1, 3600).value(), milliseconds(3600000));

  const absl::StatusOr<milliseconds> over = args.Seconds("over", 1, 0.1, 3600);
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(over.status().message(), "--over must be in [0.1, 3600]");
  EXPECT_FALSE(args.Seconds("lease-s", 3, 0.3, 3600).ok());
  EXPECT_THAT(args.Seconds("bad", 1, 0, 10).status().message(),
              HasSubstr("--bad wants a number, got 'x'"));
}

}  // namespace
}  // namespace moemesh
