// Static checks of a Grafana dashboard (deploy/grafana/moemesh-dashboard.json): load it, list
// the PromQL queries of its panels with the dashboard variables filled in, and lint it.
//
// The lint follows grafana/dashboard-linter's rules for Prometheus dashboards, without a
// full PromQL parser: the dashboard must pick its data source through a `datasource`
// variable that every panel and target uses (so one dashboard serves any Prometheus);
// rate()/irate()/increase() ranges must be $__rate_interval (a fixed range shorter than
// four scrape intervals draws gaps, a longer one hides spikes); every expression must have
// balanced brackets and quotes and name only variables the dashboard defines. Problems are
// strings "WHERE: RULE: what is wrong", WHERE naming the panel (id and title), the target
// (refId) or the variable, so a failing test says what to fix.
//
// Pure functions of their arguments; thread-safe.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace moemesh {

// Reads and parses a dashboard JSON file. NotFound when the file cannot be read,
// InvalidArgument when it is not JSON or not a JSON object.
absl::StatusOr<nlohmann::json> LoadDashboard(const std::string& path);

// One target (query) of one panel.
struct PanelQuery {
  std::string panel_title;  // as written in the dashboard, variables not substituted
  std::string ref_id;
  std::string expr;      // with the variables of PanelQueries' `vars` substituted
  bool instant = false;  // an instant query (the target's "instant": true)
};

// Every target with an "expr" of every panel, rows' nested panels included, in dashboard
// order. Variables written $name, ${name}, ${name:format} or [[name]] are replaced by
// vars[name] (the format is ignored: values are inserted as given); variables missing from
// `vars` are left as written. A live test passes the template variables (datasource,
// layer, ...) and the built-ins the panels use (__rate_interval, __interval, ...).
std::vector<PanelQuery> PanelQueries(const nlohmann::json& dashboard,
                                     const std::map<std::string, std::string>& vars);

// `text` with the variables of `vars` substituted as PanelQueries does.
std::string SubstituteVariables(absl::string_view text,
                                const std::map<std::string, std::string>& vars);

// The problems found in `dashboard`; empty when it is clean. Rules (dashboard-linter names):
//   template-datasource-rule     a variable of type datasource, named datasource or ds,
//                                with query "prometheus"
//   template-label-promql-rule   query variables use the datasource variable and their
//                                label_values()/label_names()/metrics()/query_result()
//                                query parses
//   panel-title-description-rule every panel has a title; every non-row panel a description
//   panel-id-rule                every panel has an integer id, unique in the dashboard
//   panel-gridpos-rule           every panel has a gridPos inside the 24-column grid
//   panel-datasource-rule        every non-row panel uses the datasource variable
//   panel-target-rule            every non-row, non-text panel has a target
//   target-datasource-rule       every target uses the datasource variable
//   target-refid-rule            every target has a refId, unique in its panel
//   target-rate-interval-rule    rate/irate/increase ranges are [$__rate_interval]
//   target-promql-rule           the expr is not empty, its brackets and quotes balance and
//                                it names only variables the dashboard defines or built-ins
std::vector<std::string> LintDashboard(const nlohmann::json& dashboard);

}  // namespace moemesh
