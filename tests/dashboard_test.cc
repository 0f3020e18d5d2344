// The shipped Grafana dashboard lints clean and queries only what it should; each lint rule
// catches a copy broken on purpose. Runs from the source root (ctest's working directory).
#include "tools/dashboard.h"

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moemesh {
namespace {

using nlohmann::json;
using ::testing::AllOf;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

constexpr char kDashboardPath[] = "deploy/grafana/moemesh-dashboard.json";

// What a live test substitutes: the template variables and the built-ins the panels use.
const std::map<std::string, std::string>& LiveVars() {
  static const auto* const kVars =
      new std::map<std::string, std::string>{{"datasource", "prometheus"},
                                             {"layer", "1"},
                                             {"__rate_interval", "1m"},
                                             {"__interval", "15s"},
                                             {"__range", "1h"}};
  return *kVars;
}

json Shipped() {
  absl::StatusOr<json> dashboard = LoadDashboard(kDashboardPath);
  EXPECT_TRUE(dashboard.ok()) << dashboard.status();
  return dashboard.ok() ? *dashboard : json::object();
}

json& PanelById(json& dashboard, int id) {
  for (json& panel : dashboard["panels"]) {
    if (panel["id"] == id) return panel;
  }
  ADD_FAILURE() << "no panel " << id;
  static json none;
  return none;
}

// Problems of the shipped dashboard after `edit`.
std::vector<std::string> LintEdited(const std::function<void(json&)>& edit) {
  json dashboard = Shipped();
  edit(dashboard);
  return LintDashboard(dashboard);
}

TEST(DashboardTest, ShippedDashboardLintsClean) {
  EXPECT_THAT(LintDashboard(Shipped()), IsEmpty());
}

TEST(DashboardTest, ShippedDashboardHasTheContractedVariables) {
  const json dashboard = Shipped();
  EXPECT_EQ(dashboard["uid"], "moemesh-overview");
  const json& variables = dashboard["templating"]["list"];
  ASSERT_EQ(variables.size(), 2u);
  EXPECT_EQ(variables[0]["name"], "datasource");
  EXPECT_EQ(variables[0]["type"], "datasource");
  EXPECT_EQ(variables[0]["query"], "prometheus");
  EXPECT_EQ(variables[1]["name"], "layer");
  EXPECT_EQ(variables[1]["query"]["query"],
            "label_values(moemesh_router_expert_tokens_total, layer)");
  EXPECT_EQ(variables[1]["datasource"]["uid"], "${datasource}");
}

TEST(DashboardTest, EveryPanelHasAQuery) {
  const json dashboard = Shipped();
  const std::vector<PanelQuery> queries = PanelQueries(dashboard, LiveVars());
  int panels = 0;
  for (const json& panel : dashboard["panels"]) {
    if (panel["type"] == "row") continue;
    ++panels;
    int n = 0;
    for (const PanelQuery& q : queries) n += q.panel_title == panel["title"] ? 1 : 0;
    EXPECT_GE(n, 1) << panel["title"];
  }
  EXPECT_GE(panels, 15);
}

TEST(DashboardTest, PanelQueriesSubstituteEveryVariable) {
  const std::vector<PanelQuery> queries = PanelQueries(Shipped(), LiveVars());
  ASSERT_FALSE(queries.empty());
  bool saw_layer = false;
  bool saw_instant = false;
  for (const PanelQuery& q : queries) {
    EXPECT_THAT(q.expr, Not(HasSubstr("$"))) << q.panel_title << " " << q.ref_id;
    EXPECT_THAT(q.expr, Not(HasSubstr("[["))) << q.panel_title << " " << q.ref_id;
    EXPECT_FALSE(q.ref_id.empty()) << q.panel_title;
    saw_layer |= q.expr.find("layer=\"1\"") != std::string::npos;
    saw_instant |= q.instant;
  }
  EXPECT_TRUE(saw_layer);
  EXPECT_TRUE(saw_instant);
}

TEST(DashboardTest, HeatmapQueriesPerExpertLoadOfTheLayer) {
  const std::vector<PanelQuery> queries = PanelQueries(Shipped(), LiveVars());
  EXPECT_THAT(queries,
              Contains(::testing::Field(&PanelQuery::expr,
                                        "sum by (expert) (rate(moemesh_router_expert_tokens_total"
                                        "{layer=\"1\"}[1m]))")));
}

TEST(DashboardTest, SubstitutesEveryVariableForm) {
  const std::map<std::string, std::string> vars = {{"layer", "7"}, {"__rate_interval", "2m"}};
  EXPECT_EQ(SubstituteVariables("a{layer=\"$layer\"}[$__rate_interval]", vars),
            "a{layer=\"7\"}[2m]");
  EXPECT_EQ(SubstituteVariables("${layer} ${layer:csv} [[layer]] [[layer:raw]]", vars), "7 7 7 7");
  // Longer names, unknown variables and capture groups stay as written.
  EXPECT_EQ(SubstituteVariables("$layers $other ${other} $1 [x]", vars),
            "$layers $other ${other} $1 [x]");
}

TEST(DashboardTest, LoadReportsMissingAndBadFiles) {
  EXPECT_EQ(LoadDashboard("deploy/grafana/no-such-dashboard.json").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(LoadDashboard("deploy/CMakeLists.txt").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(DashboardTest, CatchesHardCodedDatasourceUid) {
  const std::vector<std::string> problems = LintEdited([](json& d) {
    json& panel = PanelById(d, 13);
    panel["datasource"] = {{"type", "prometheus"}, {"uid", "P1809F7CD0C75ACF3"}};
    panel["targets"][1]["datasource"] = panel["datasource"];
  });
  EXPECT_THAT(
      problems,
      Contains(AllOf(HasSubstr("panel 13 \"Dispatch latency"), HasSubstr("panel-datasource-rule"),
                     HasSubstr("hard-coded data source"), HasSubstr("P1809F7CD0C75ACF3"))));
  EXPECT_THAT(problems, Contains(AllOf(HasSubstr("panel 13 "), HasSubstr("target B"),
                                       HasSubstr("target-datasource-rule"))));
  EXPECT_EQ(problems.size(), 2u) << ::testing::PrintToString(problems);
}

TEST(DashboardTest, CatchesFixedRateRange) {
  const std::vector<std::string> problems = LintEdited([](json& d) {
    json& target = PanelById(d, 8)["targets"][0];
    std::string expr = target["expr"];
    expr.replace(expr.find("[$__rate_interval]"), 18, "[5m]");
    target["expr"] = expr;
  });
  EXPECT_THAT(problems, Contains(AllOf(HasSubstr("panel 8 \"Requests by code\" target A"),
                                       HasSubstr("target-rate-interval-rule"), HasSubstr("[5m]"))));
  EXPECT_EQ(problems.size(), 1u) << ::testing::PrintToString(problems);
}

TEST(DashboardTest, CatchesMissingDatasourceVariable) {
  const std::vector<std::string> problems = LintEdited([](json& d) {
    json& list = d["templating"]["list"];
    list.erase(list.begin());
  });
  // Reported once, not once per panel naming ${datasource}.
  EXPECT_THAT(problems, ::testing::ElementsAre(HasSubstr("dashboard: template-datasource-rule")));
}

TEST(DashboardTest, CatchesReferenceToANonDatasourceVariable) {
  const std::vector<std::string> problems = LintEdited([](json& d) {
    PanelById(d, 2)["datasource"] = {{"type", "prometheus"}, {"uid", "${layer}"}};
  });
  EXPECT_THAT(problems,
              Contains(AllOf(HasSubstr("panel 2 "), HasSubstr("panel-datasource-rule"),
                             HasSubstr("${layer} is not a variable of type datasource"))));
  EXPECT_EQ(problems.size(), 1u) << ::testing::PrintToString(problems);
}

TEST(DashboardTest, CatchesDatasourceVariableWithAnotherName) {
  const std::vector<std::string> problems =
      LintEdited([](json& d) { d["templating"]["list"][0]["name"] = "prom"; });
  EXPECT_THAT(problems, Contains(HasSubstr("dashboard: template-datasource-rule")));
  EXPECT_THAT(problems,
              Contains(AllOf(HasSubstr("panel 2 "), HasSubstr("panel-datasource-rule"),
                             HasSubstr("${datasource} is not a variable"),
                             HasSubstr("want {\"type\":\"prometheus\",\"uid\":\"${prom}\"}"))));
}

TEST(DashboardTest, CatchesDuplicatePanelId) {
  const std::vector<std::string> problems = LintEdited([](json& d) { PanelById(d, 9)["id"] = 8; });
  EXPECT_THAT(problems,
              Contains(AllOf(HasSubstr("panel 8 \"Error ratio\""), HasSubstr("panel-id-rule"),
                             HasSubstr("panel 8 \"Requests by code\""))));
  EXPECT_EQ(problems.size(), 1u) << ::testing::PrintToString(problems);
}

TEST(DashboardTest, CatchesUnbalancedParenthesis) {
  const std::vector<std::string> problems = LintEdited([](json& d) {
    json& target = PanelById(d, 15)["targets"][1];
    std::string expr = target["expr"];
    target["expr"] = expr.substr(0, expr.size() - 1);
  });
  EXPECT_THAT(problems,
              Contains(AllOf(HasSubstr("panel 15 "), HasSubstr("target B"),
                             HasSubstr("target-promql-rule"), HasSubstr("unclosed '('"))));
  EXPECT_EQ(problems.size(), 1u) << ::testing::PrintToString(problems);
}

TEST(DashboardTest, CatchesUnbalancedQuoteAndBrackets) {
  const std::vector<std::string> problems = LintEdited([](json& d) {
    PanelById(d, 4)["targets"][0]["expr"] =
        "max by (layer) (moemesh_router_expert_imbalance{layer=\"1})";
    PanelById(d, 5)["targets"][0]["expr"] = "max by (layer) (moemesh_router_balance_statistic])";
  });
  EXPECT_THAT(problems, Contains(AllOf(HasSubstr("panel 4 "), HasSubstr("unterminated string"))));
  EXPECT_THAT(problems, Contains(AllOf(HasSubstr("panel 5 "), HasSubstr("unbalanced ']'"))));
}

TEST(DashboardTest, BracketsInsideStringsAreNotCounted) {
  const std::vector<std::string> problems = LintEdited([](json& d) {
    PanelById(d, 4)["targets"][0]["expr"] =
        "max by (layer) (moemesh_router_expert_imbalance{layer=~\"[(0-9\"})";
  });
  EXPECT_THAT(problems, IsEmpty());
}

TEST(DashboardTest, CatchesUnknownVariable) {
  const std::vector<std::string> problems = LintEdited([](json& d) {
    PanelById(d, 20)["targets"][0]["expr"] =
        "sum by (instance) (moemesh_expert_inflight_requests{instance=~\"$instance\"})";
  });
  EXPECT_THAT(problems, Contains(AllOf(HasSubstr("panel 20 "), HasSubstr("target-promql-rule"),
                                       HasSubstr("unknown variable $instance"))));
  EXPECT_EQ(problems.size(), 1u) << ::testing::PrintToString(problems);
}

TEST(DashboardTest, RateIntervalRuleAcceptsEveryVariableFormAndNeedsARange) {
  const std::vector<std::string> problems = LintEdited([](json& d) {
    json& targets = PanelById(d, 13)["targets"];
    targets[0]["expr"] = "sum(rate(moemesh_router_tokens_total[${__rate_interval}]))";
    targets[1]["expr"] = "sum(irate(moemesh_router_tokens_total[[[__rate_interval]]]))";
    PanelById(d, 14)["targets"][0]["expr"] = "sum(increase(moemesh_router_tokens_total))";
    PanelById(d, 12)["targets"][0]["expr"] =
        "sum(rate(moemesh_router_tokens_total[$__rate_interval:1m]))";
  });
  EXPECT_THAT(problems,
              Contains(AllOf(HasSubstr("panel 14 "), HasSubstr("increase() has no range"))));
  EXPECT_THAT(problems,
              Contains(AllOf(HasSubstr("panel 12 "), HasSubstr("[$__rate_interval:1m]"))));
  EXPECT_EQ(problems.size(), 2u) << ::testing::PrintToString(problems);
}

TEST(DashboardTest, ChecksPanelsNestedInCollapsedRows) {
  const std::vector<std::string> problems = LintEdited([](json& d) {
    json& row = PanelById(d, 17);
    row["collapsed"] = true;
    json nested = PanelById(d, 18);
    nested["id"] = 99;
    nested["title"] = "";
    nested["targets"][0]["expr"] = "rate(moemesh_expert_requests_total[1m])";
    row["panels"].push_back(nested);
  });
  EXPECT_THAT(problems, Contains(AllOf(HasSubstr("panel 99 \"\""),
                                       HasSubstr("panel-title-description-rule"))));
  EXPECT_THAT(problems,
              Contains(AllOf(HasSubstr("panel 99 "), HasSubstr("target-rate-interval-rule"))));
}

TEST(DashboardTest, CatchesPanelsWithoutTargetsOrGridPos) {
  const std::vector<std::string> problems = LintEdited([](json& d) {
    PanelById(d, 10)["targets"] = json::array();
    PanelById(d, 11)["gridPos"]["x"] = 22;
  });
  EXPECT_THAT(problems, Contains(AllOf(HasSubstr("panel 10 "), HasSubstr("panel-target-rule"))));
  EXPECT_THAT(problems, Contains(AllOf(HasSubstr("panel 11 "), HasSubstr("panel-gridpos-rule"))));
}

TEST(DashboardTest, CatchesBadLayerVariable) {
  std::vector<std::string> problems = LintEdited([](json& d) {
    d["templating"]["list"][1]["datasource"] = {{"type", "prometheus"}, {"uid", "abc"}};
  });
  EXPECT_THAT(problems, Contains(AllOf(HasSubstr("variable \"layer\""),
                                       HasSubstr("template-label-promql-rule"), HasSubstr("abc"))));
  problems = LintEdited([](json& d) {
    d["templating"]["list"][1]["query"]["query"] =
        "label_values(moemesh_router_expert_tokens_total, layer";
  });
  EXPECT_THAT(problems,
              Contains(AllOf(HasSubstr("variable \"layer\""), HasSubstr("unclosed '('"))));
  problems = LintEdited([](json& d) {
    d["templating"]["list"][1]["query"]["query"] =
        "label_values(moemesh_router_expert_tokens_total)";
  });
  EXPECT_THAT(problems, IsEmpty()) << "label_values(label) is valid";
  problems = LintEdited([](json& d) {
    d["templating"]["list"][1]["query"]["query"] = "label_values(up{job=\"x\"}, )";
  });
  EXPECT_THAT(problems, Contains(HasSubstr("is not label_values(label)")));
  problems = LintEdited([](json& d) { d["templating"]["list"][1]["query"]["query"] = "up"; });
  EXPECT_THAT(problems, Contains(HasSubstr("is not label_values()")));
}

}  // namespace
}  // namespace moemesh
