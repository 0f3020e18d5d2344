// Multi-document YAML on stdin (e.g. `kubectl kustomize deploy/k8s`) to one JSON array on
// stdout; tests/k8s_podman_test.cc reads the rendered manifests this way.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

const docs = parseAllDocuments(readFileSync(0, "utf8")).map((d) => d.toJS()).filter((d) => d);
process.stdout.write(JSON.stringify(docs));
