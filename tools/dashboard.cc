#include "tools/dashboard.h"

#include <cctype>
#include <cstdint>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace moemesh {
namespace {

using nlohmann::json;

// Variables Grafana defines for every dashboard.
const std::set<std::string>& BuiltinVariables() {
  static const auto* const kNames = new std::set<std::string>{
      "__interval", "__interval_ms", "__rate_interval", "__rate_interval_ms",
      "__range",    "__range_s",     "__range_ms",      "__from",
      "__to",       "__dashboard",   "__org",           "__user",
      "__timezone"};
  return *kNames;
}

// Panel types that show no query results, so need no targets or data source.
bool IsQuerylessPanelType(const std::string& type) {
  return type == "row" || type == "text" || type == "news" || type == "dashlist" ||
         type == "alertlist" || type == "annolist";
}

const json* Member(const json& j, const char* key) {
  if (!j.is_object()) return nullptr;
  const auto it = j.find(key);
  return it == j.end() ? nullptr : &*it;
}

std::string StringMember(const json& j, const char* key) {
  const json* v = Member(j, key);
  return v != nullptr && v->is_string() ? v->get<std::string>() : std::string();
}

bool IsWordChar(char c) { return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_'; }

// One variable reference in a text: text[begin, end) refers to `name`.
struct VariableRef {
  size_t begin;
  size_t end;
  std::string name;
};

// Grafana's variable syntax: $name, ${name}, ${name:format}, ${name.field}, [[name]],
// [[name:format]]; a name is a run of word characters.
std::vector<VariableRef> FindVariables(absl::string_view text) {
  std::vector<VariableRef> refs;
  size_t i = 0;
  while (i < text.size()) {
    if (text[i] == '$' && i + 1 < text.size() && text[i + 1] == '{') {
      size_t n = i + 2;
      while (n < text.size() && IsWordChar(text[n])) ++n;
      const size_t close = text.find('}', n);
      if (n > i + 2 && close != absl::string_view::npos &&
          (text[n] == '}' || text[n] == ':' || text[n] == '.')) {
        refs.push_back({i, close + 1, std::string(text.substr(i + 2, n - i - 2))});
        i = close + 1;
        continue;
      }
    } else if (text[i] == '$') {
      size_t n = i + 1;
      while (n < text.size() && IsWordChar(text[n])) ++n;
      if (n > i + 1) {
        refs.push_back({i, n, std::string(text.substr(i + 1, n - i - 1))});
        i = n;
        continue;
      }
    } else if (text.substr(i, 2) == "[[") {
      size_t n = i + 2;
      while (n < text.size() && IsWordChar(text[n])) ++n;
      const size_t close = text.find("]]", n);
      bool format_ok = close != absl::string_view::npos && n > i + 2;
      if (format_ok && close > n) {
        format_ok = text[n] == ':';
        for (size_t k = n + 1; format_ok && k < close; ++k) format_ok = IsWordChar(text[k]);
      }
      if (format_ok) {
        refs.push_back({i, close + 2, std::string(text.substr(i + 2, n - i - 2))});
        i = close + 2;
        continue;
      }
    }
    ++i;
  }
  return refs;
}

// `text` with every reference replaced by replace(ref), or left as written when that
// returns false.
template <typename Replace>
std::string RewriteVariables(absl::string_view text, Replace replace) {
  std::string out;
  size_t last = 0;
  for (const VariableRef& ref : FindVariables(text)) {
    std::string value;
    if (!replace(ref, &value)) continue;
    absl::StrAppend(&out, text.substr(last, ref.begin - last), value);
    last = ref.end;
  }
  absl::StrAppend(&out, text.substr(last));
  return out;
}

// Every variable written as $name, so that the PromQL checks see one form.
std::string CanonicalVariables(absl::string_view text) {
  return RewriteVariables(text, [](const VariableRef& ref, std::string* value) {
    *value = absl::StrCat("$", ref.name);
    return true;
  });
}

// ---- A PromQL tokenizer, enough for the checks below (no grammar). ----

enum class TokenKind { kIdent, kNumber, kString, kVariable, kPunct };

struct Token {
  TokenKind kind;
  std::string text;  // a variable's name without '$'; a string with its quotes
  size_t pos;        // offset in the expression
};

bool IsIdentStart(char c) {
  return std::isalpha(static_cast<unsigned char>(c)) != 0 || c == '_' || c == ':';
}
bool IsIdentChar(char c) { return IsWordChar(c) || c == ':'; }

// Tokens of `expr` (variables written $name); InvalidArgument for an unterminated string.
absl::StatusOr<std::vector<Token>> Tokenize(absl::string_view expr) {
  std::vector<Token> tokens;
  size_t i = 0;
  while (i < expr.size()) {
    const char c = expr[i];
    const size_t start = i;
    if (std::isspace(static_cast<unsigned char>(c)) != 0) {
      ++i;
    } else if (c == '#') {  // a comment, to the end of the line
      while (i < expr.size() && expr[i] != '\n') ++i;
    } else if (c == '"' || c == '\'' || c == '`') {
      ++i;
      while (i < expr.size() && expr[i] != c) {
        // Raw (backtick) strings have no escapes.
        i += (c != '`' && expr[i] == '\\') ? 2 : 1;
      }
      if (i >= expr.size()) {
        return absl::InvalidArgumentError(
            absl::StrCat("unterminated string starting at offset ", start));
      }
      ++i;
      tokens.push_back({TokenKind::kString, std::string(expr.substr(start, i - start)), start});
    } else if (c == '$' && i + 1 < expr.size() && IsWordChar(expr[i + 1])) {
      ++i;
      while (i < expr.size() && IsWordChar(expr[i])) ++i;
      tokens.push_back(
          {TokenKind::kVariable, std::string(expr.substr(start + 1, i - start - 1)), start});
    } else if (IsIdentStart(c)) {
      while (i < expr.size() && IsIdentChar(expr[i])) ++i;
      tokens.push_back({TokenKind::kIdent, std::string(expr.substr(start, i - start)), start});
    } else if (std::isdigit(static_cast<unsigned char>(c)) != 0 || c == '.') {
      // Numbers and durations (5m, 1h30m, 0.5, 1e3).
      while (i < expr.size() && (IsWordChar(expr[i]) || expr[i] == '.')) ++i;
      tokens.push_back({TokenKind::kNumber, std::string(expr.substr(start, i - start)), start});
    } else {
      ++i;
      tokens.push_back({TokenKind::kPunct, std::string(1, c), start});
    }
  }
  return tokens;
}

bool IsPunct(const Token& t, const char* text) {
  return t.kind == TokenKind::kPunct && t.text == text;
}

// "" when (), [] and {} balance; else what does not.
std::string BracketProblem(const std::vector<Token>& tokens) {
  std::vector<const Token*> open;
  for (const Token& t : tokens) {
    if (t.kind != TokenKind::kPunct) continue;
    const char c = t.text[0];
    if (c == '(' || c == '[' || c == '{') {
      open.push_back(&t);
    } else if (c == ')' || c == ']' || c == '}') {
      const char want = c == ')' ? '(' : c == ']' ? '[' : '{';
      if (open.empty() || open.back()->text[0] != want) {
        return absl::StrCat("unbalanced '", t.text, "' at offset ", t.pos);
      }
      open.pop_back();
    }
  }
  if (!open.empty()) {
    return absl::StrCat("unclosed '", open.back()->text, "' at offset ", open.back()->pos);
  }
  return "";
}

// Index of the bracket closing tokens[open]; tokens must balance.
size_t MatchingBracket(const std::vector<Token>& tokens, size_t open) {
  int depth = 0;
  for (size_t i = open; i < tokens.size(); ++i) {
    if (tokens[i].kind != TokenKind::kPunct) continue;
    const char c = tokens[i].text[0];
    if (c == '(' || c == '[' || c == '{') ++depth;
    if (c == ')' || c == ']' || c == '}') --depth;
    if (depth == 0) return i;
  }
  return tokens.size() - 1;
}

// Rule names, with static storage: findings point at them.
constexpr char kPromqlRule[] = "target-promql-rule";
constexpr char kRateIntervalRule[] = "target-rate-interval-rule";
constexpr char kTemplateQueryRule[] = "template-label-promql-rule";

struct Finding {
  const char* rule;
  std::string message;
};

// rate(), irate() and increase() over a range other than [$__rate_interval]. `tokens` of
// `expr` must balance.
std::vector<Finding> RateIntervalFindings(absl::string_view expr,
                                          const std::vector<Token>& tokens) {
  std::vector<Finding> findings;
  std::set<size_t> reported;  // '[' already reported, for nested rate functions
  for (size_t i = 0; i + 1 < tokens.size(); ++i) {
    const Token& fn = tokens[i];
    if (fn.kind != TokenKind::kIdent ||
        (fn.text != "rate" && fn.text != "irate" && fn.text != "increase") ||
        !IsPunct(tokens[i + 1], "(")) {
      continue;
    }
    const size_t close = MatchingBracket(tokens, i + 1);
    bool has_range = false;
    for (size_t k = i + 2; k < close; ++k) {
      if (!IsPunct(tokens[k], "[")) continue;
      has_range = true;
      const size_t end = MatchingBracket(tokens, k);
      const bool ok = end == k + 2 && tokens[k + 1].kind == TokenKind::kVariable &&
                      tokens[k + 1].text == "__rate_interval";
      if (!ok && reported.insert(k).second) {
        findings.push_back(
            {kRateIntervalRule,
             absl::StrCat(fn.text, "() range is ",
                          expr.substr(tokens[k].pos, tokens[end].pos + 1 - tokens[k].pos),
                          ", want [$__rate_interval]")});
      }
    }
    if (!has_range) {
      findings.push_back(
          {kRateIntervalRule, absl::StrCat(fn.text, "() has no range, want [$__rate_interval]")});
    }
  }
  return findings;
}

// Variables of `text` that are neither in `known` nor capture groups ($1 of label_replace).
std::vector<Finding> UnknownVariableFindings(absl::string_view text, const char* rule,
                                             const std::set<std::string>& known) {
  std::vector<Finding> findings;
  for (const VariableRef& ref : FindVariables(text)) {
    if (std::isdigit(static_cast<unsigned char>(ref.name[0])) != 0) continue;
    if (known.count(ref.name) == 0) {
      findings.push_back(
          {rule, absl::StrCat("unknown variable ", text.substr(ref.begin, ref.end - ref.begin))});
    }
  }
  return findings;
}

// The tokens of `text` when it tokenizes and its brackets balance; otherwise what is
// wrong goes to `findings` (as `rule`).
std::optional<std::vector<Token>> WellFormedTokens(const std::string& text, const char* rule,
                                                   std::vector<Finding>& findings) {
  absl::StatusOr<std::vector<Token>> tokens = Tokenize(text);
  if (!tokens.ok()) {
    findings.push_back({rule, std::string(tokens.status().message())});
    return std::nullopt;
  }
  const std::string brackets = BracketProblem(*tokens);
  if (!brackets.empty()) {
    findings.push_back({rule, brackets});
    return std::nullopt;
  }
  return *std::move(tokens);
}

// The problems of a target's PromQL expression.
std::vector<Finding> ExprFindings(const std::string& expr, const std::set<std::string>& known) {
  constexpr const char* kRule = kPromqlRule;
  if (expr.find_first_not_of(" \t\r\n") == std::string::npos) return {{kRule, "empty expr"}};
  std::vector<Finding> findings = UnknownVariableFindings(expr, kRule, known);
  const std::string canonical = CanonicalVariables(expr);
  const std::optional<std::vector<Token>> tokens = WellFormedTokens(canonical, kRule, findings);
  if (!tokens) return findings;
  for (Finding& f : RateIntervalFindings(canonical, *tokens)) findings.push_back(std::move(f));
  return findings;
}

// The problems of a query variable's query: label_values(label),
// label_values(selector, label), label_names([selector]), metrics(regex) or
// query_result(expr), as the Prometheus data source takes them.
std::vector<Finding> TemplateQueryFindings(const std::string& query,
                                           const std::set<std::string>& known) {
  constexpr const char* kRule = kTemplateQueryRule;
  if (query.find_first_not_of(" \t\r\n") == std::string::npos) return {{kRule, "empty query"}};
  std::vector<Finding> findings = UnknownVariableFindings(query, kRule, known);
  const std::optional<std::vector<Token>> tokens =
      WellFormedTokens(CanonicalVariables(query), kRule, findings);
  if (!tokens) return findings;
  const std::vector<Token>& t = *tokens;
  const bool is_call = t.size() >= 3 && t[0].kind == TokenKind::kIdent && IsPunct(t[1], "(") &&
                       MatchingBracket(t, 1) == t.size() - 1;
  const std::string fn = is_call ? t[0].text : "";
  if (fn != "label_values" && fn != "label_names" && fn != "metrics" && fn != "query_result") {
    findings.push_back({kRule, absl::StrCat("query '", query,
                                            "' is not label_values(), label_names(), metrics() "
                                            "or query_result()")});
    return findings;
  }
  if (fn == "label_values") {
    // The label is the last argument: one identifier after the last top-level comma.
    size_t last_arg = 2;
    for (size_t i = 2; i + 1 < t.size(); ++i) {
      if (IsPunct(t[i], "(") || IsPunct(t[i], "[") || IsPunct(t[i], "{")) {
        i = MatchingBracket(t, i);
      } else if (IsPunct(t[i], ",")) {
        last_arg = i + 1;
      }
    }
    const bool label_ok = last_arg + 2 == t.size() && t[last_arg].kind == TokenKind::kIdent &&
                          t[last_arg].text.find(':') == std::string::npos;
    const bool selector_ok = last_arg == 2 || last_arg > 3;  // no empty selector before ','
    if (!label_ok || !selector_ok) {
      findings.push_back(
          {kRule, absl::StrCat("query '", query,
                               "' is not label_values(label) or label_values(selector, label)")});
    }
  } else if (fn == "query_result" && t.size() == 3) {
    findings.push_back({kRule, "query_result() without an expression"});
  }
  return findings;
}

// Every panel, nested ones (collapsed rows, legacy "rows") included, in dashboard order.
void CollectPanels(const json& panels, std::vector<const json*>* out) {
  if (!panels.is_array()) return;
  for (const json& panel : panels) {
    out->push_back(&panel);
    if (const json* nested = Member(panel, "panels")) CollectPanels(*nested, out);
  }
}

std::vector<const json*> AllPanels(const json& dashboard) {
  std::vector<const json*> panels;
  if (const json* top = Member(dashboard, "panels")) CollectPanels(*top, &panels);
  if (const json* rows = Member(dashboard, "rows"); rows != nullptr && rows->is_array()) {
    for (const json& row : *rows) {
      if (const json* nested = Member(row, "panels")) CollectPanels(*nested, &panels);
    }
  }
  return panels;
}

std::string PanelName(const json& panel) {
  const json* id = Member(panel, "id");
  return absl::StrCat("panel ", id != nullptr && id->is_number_integer() ? id->dump() : "?", " \"",
                      StringMember(panel, "title"), "\"");
}

// The query of a query variable: a string, or {"query": "..."} (Grafana 10+).
std::string VariableQuery(const json& variable) {
  const json* query = Member(variable, "query");
  if (query == nullptr) return "";
  if (query->is_string()) return query->get<std::string>();
  return StringMember(*query, "query");
}

struct LintContext {
  std::set<std::string> known_variables;       // template variables and built-ins
  std::set<std::string> datasource_variables;  // names of the variables of type datasource
  std::vector<std::string> problems;

  void Add(absl::string_view where, absl::string_view rule, absl::string_view message) {
    problems.push_back(absl::StrCat(where, ": ", rule, ": ", message));
  }

  // "" when `ds` (a "datasource" member) picks the data source through a datasource
  // variable: "$ds", "${ds}" or {"type": "prometheus", "uid": "${ds}"}; else why not.
  // A reference to a variable passes while the dashboard defines no datasource variable
  // at all: template-datasource-rule reports that once, not once per panel.
  std::string DatasourceProblem(const json* ds) const {
    const std::string want = absl::StrCat(
        "want {\"type\":\"prometheus\",\"uid\":\"${",
        datasource_variables.empty() ? std::string("datasource") : *datasource_variables.begin(),
        "}\"}");
    if (ds == nullptr || ds->is_null()) return absl::StrCat("data source not set, ", want);
    std::string ref;
    if (ds->is_string()) {
      ref = ds->get<std::string>();
    } else if (ds->is_object()) {
      const std::string type = StringMember(*ds, "type");
      if (!type.empty() && type != "prometheus") {
        return absl::StrCat("data source type is ", type, ", ", want);
      }
      ref = StringMember(*ds, "uid");
    }
    const std::vector<VariableRef> refs = FindVariables(ref);
    if (refs.size() != 1 || refs[0].begin != 0 || refs[0].end != ref.size()) {
      return absl::StrCat("hard-coded data source ", ds->dump(), ", ", want);
    }
    if (datasource_variables.empty() || datasource_variables.count(refs[0].name) != 0) return "";
    return absl::StrCat("data source ", ref, " is not a variable of type datasource, ", want);
  }
};

void CheckTemplating(const json& dashboard, LintContext* c) {
  std::vector<const json*> variables;
  if (const json* templating = Member(dashboard, "templating")) {
    if (const json* list = Member(*templating, "list"); list != nullptr && list->is_array()) {
      for (const json& v : *list) variables.push_back(&v);
    }
  }
  bool has_datasource_variable = false;
  for (const json* v : variables) {
    const std::string name = StringMember(*v, "name");
    if (name.empty()) continue;
    c->known_variables.insert(name);
    if (StringMember(*v, "type") != "datasource") continue;
    c->datasource_variables.insert(name);
    if ((name == "datasource" || name == "ds") && StringMember(*v, "query") == "prometheus") {
      has_datasource_variable = true;
    }
  }
  if (!has_datasource_variable) {
    c->Add("dashboard", "template-datasource-rule",
           "no variable of type datasource named datasource or ds with query prometheus");
  }
  for (const json* v : variables) {
    if (StringMember(*v, "type") != "query") continue;
    const std::string where = absl::StrCat("variable \"", StringMember(*v, "name"), "\"");
    if (const std::string p = c->DatasourceProblem(Member(*v, "datasource")); !p.empty()) {
      c->Add(where, "template-label-promql-rule", p);
    }
    for (const Finding& f : TemplateQueryFindings(VariableQuery(*v), c->known_variables)) {
      c->Add(where, f.rule, f.message);
    }
  }
}

void CheckGridPos(const json& panel, const std::string& where, LintContext* c) {
  const json* grid = Member(panel, "gridPos");
  int64_t v[4] = {-1, -1, -1, -1};  // h, w, x, y
  const char* keys[4] = {"h", "w", "x", "y"};
  for (int i = 0; i < 4 && grid != nullptr; ++i) {
    const json* field = Member(*grid, keys[i]);
    if (field != nullptr && field->is_number_integer()) v[i] = field->get<int64_t>();
  }
  const bool ok = v[0] >= 1 && v[1] >= 1 && v[2] >= 0 && v[3] >= 0 && v[2] + v[1] <= 24;
  if (!ok) {
    c->Add(where, "panel-gridpos-rule",
           absl::StrCat("gridPos is ", grid == nullptr ? "not set" : grid->dump(),
                        ", want integer h>=1, w>=1, x>=0, y>=0 with x+w<=24"));
  }
}

void CheckTarget(const json& target, const std::string& panel_where, std::set<std::string>* ref_ids,
                 LintContext* c) {
  const std::string ref_id = StringMember(target, "refId");
  const std::string where =
      absl::StrCat(panel_where, " target ", ref_id.empty() ? std::string("?") : ref_id);
  if (ref_id.empty()) {
    c->Add(where, "target-refid-rule", "no refId");
  } else if (!ref_ids->insert(ref_id).second) {
    c->Add(where, "target-refid-rule", "refId used twice in the panel");
  }
  if (const std::string p = c->DatasourceProblem(Member(target, "datasource")); !p.empty()) {
    c->Add(where, "target-datasource-rule", p);
  }
  for (const Finding& f : ExprFindings(StringMember(target, "expr"), c->known_variables)) {
    c->Add(where, f.rule, f.message);
  }
}

void CheckPanels(const json& dashboard, LintContext* c) {
  std::map<int64_t, std::string> ids;  // id -> the first panel with it
  for (const json* panel : AllPanels(dashboard)) {
    const std::string where = PanelName(*panel);
    const std::string type = StringMember(*panel, "type");
    if (StringMember(*panel, "title").empty()) {
      c->Add(where, "panel-title-description-rule", "no title");
    }
    if (type != "row" && StringMember(*panel, "description").empty()) {
      c->Add(where, "panel-title-description-rule", "no description");
    }
    const json* id = Member(*panel, "id");
    if (id == nullptr || !id->is_number_integer()) {
      c->Add(where, "panel-id-rule", "no integer id");
    } else if (const auto [it, inserted] = ids.emplace(id->get<int64_t>(), where); !inserted) {
      c->Add(where, "panel-id-rule", absl::StrCat("id also used by ", it->second));
    }
    CheckGridPos(*panel, where, c);
    if (IsQuerylessPanelType(type)) continue;
    if (const std::string p = c->DatasourceProblem(Member(*panel, "datasource")); !p.empty()) {
      c->Add(where, "panel-datasource-rule", p);
    }
    const json* targets = Member(*panel, "targets");
    if (targets == nullptr || !targets->is_array() || targets->empty()) {
      c->Add(where, "panel-target-rule", "no targets");
      continue;
    }
    std::set<std::string> ref_ids;
    for (const json& target : *targets) CheckTarget(target, where, &ref_ids, c);
  }
}

}  // namespace

absl::StatusOr<nlohmann::json> LoadDashboard(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read dashboard ", path));
  std::stringstream text;
  text << in.rdbuf();
  json dashboard;
  try {
    dashboard = json::parse(text.str());
  } catch (const json::parse_error& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not JSON: ", e.what()));
  }
  if (!dashboard.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  return dashboard;
}

std::string SubstituteVariables(absl::string_view text,
                                const std::map<std::string, std::string>& vars) {
  return RewriteVariables(text, [&vars](const VariableRef& ref, std::string* value) {
    const auto it = vars.find(ref.name);
    if (it == vars.end()) return false;
    *value = it->second;
    return true;
  });
}

std::vector<PanelQuery> PanelQueries(const nlohmann::json& dashboard,
                                     const std::map<std::string, std::string>& vars) {
  std::vector<PanelQuery> queries;
  for (const json* panel : AllPanels(dashboard)) {
    const json* targets = Member(*panel, "targets");
    if (targets == nullptr || !targets->is_array()) continue;
    for (const json& target : *targets) {
      const json* expr = Member(target, "expr");
      if (expr == nullptr || !expr->is_string()) continue;
      const json* instant = Member(target, "instant");
      queries.push_back({StringMember(*panel, "title"), StringMember(target, "refId"),
                         SubstituteVariables(expr->get<std::string>(), vars),
                         instant != nullptr && instant->is_boolean() && instant->get<bool>()});
    }
  }
  return queries;
}

std::vector<std::string> LintDashboard(const nlohmann::json& dashboard) {
  if (!dashboard.is_object()) return {"dashboard: dashboard-rule: not a JSON object"};
  LintContext c;
  c.known_variables = BuiltinVariables();
  CheckTemplating(dashboard, &c);
  CheckPanels(dashboard, &c);
  return std::move(c.problems);
}

}  // namespace moemesh
