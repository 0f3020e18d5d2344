#include "services/runtime/drain_gate.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <optional>
#include <thread>

#include "absl/status/status.h"

namespace moemesh {
namespace {

using std::chrono::hours;
using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;
using Clock = std::chrono::system_clock;

TEST(DrainGateTest, DrainRefusesNewCallsNamingTheServer) {
  DrainGate gate("expert service e0", milliseconds(0));
  ASSERT_TRUE(gate.Admit().ok());
  EXPECT_TRUE(gate.Drain(Clock::now() + seconds(5)));
  const absl::StatusOr<DrainGate::Admission> late = gate.Admit();
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(late.status().message(), HasSubstr("expert service e0 is draining"));
  EXPECT_TRUE(gate.draining());
  EXPECT_EQ(gate.in_flight(), 0);
}

TEST(DrainGateTest, DrainWaitsForTheAdmittedCallAndThenTheLinger) {
  constexpr milliseconds kLinger(300);
  DrainGate gate("router", kLinger);
  std::optional<DrainGate::Admission> call(gate.Admit().value());
  std::promise<Clock::time_point> left;
  std::thread caller([&] {
    std::this_thread::sleep_for(milliseconds(100));
    const Clock::time_point before = Clock::now();
    call.reset();  // the handler returns
    left.set_value(before);
  });
  std::future<Clock::time_point> left_at = left.get_future();
  EXPECT_TRUE(gate.Drain(Clock::now() + seconds(60)));
  // Drain returned after the call left, and its reply had the linger to go out.
  ASSERT_EQ(left_at.wait_for(seconds(0)), std::future_status::ready);
  EXPECT_GE(Clock::now(), left_at.get() + kLinger);
  EXPECT_EQ(gate.in_flight(), 0);
  caller.join();
}

TEST(DrainGateTest, NoLingerWithoutARecentCall) {
  // Never a call: a linger of an hour does not delay the drain.
  DrainGate gate("router", hours(1));
  auto drained =
      std::async(std::launch::async, [&] { return gate.Drain(Clock::now() + hours(1)); });
  ASSERT_EQ(drained.wait_for(seconds(30)), std::future_status::ready);
  EXPECT_TRUE(drained.get());
}

TEST(DrainGateTest, TheDeadlineBoundsTheLinger) {
  DrainGate gate("router", hours(1));
  { const DrainGate::Admission call = gate.Admit().value(); }
  auto drained =
      std::async(std::launch::async, [&] { return gate.Drain(Clock::now() + milliseconds(100)); });
  ASSERT_EQ(drained.wait_for(seconds(30)), std::future_status::ready);
  EXPECT_TRUE(drained.get());
}

TEST(DrainGateTest, ACallStillRunningAtTheDeadlineMakesDrainFalse) {
  DrainGate gate("router", milliseconds(0));
  const DrainGate::Admission call = gate.Admit().value();
  EXPECT_FALSE(gate.Drain(Clock::now() + milliseconds(50)));
  EXPECT_EQ(gate.in_flight(), 1);
}

}  // namespace
}  // namespace moemesh
