// Offline, strict validation of rendered manifests: every object against its Kubernetes API
// schema (kubernetes-models) or CRD schema (@kubernetes-models/keda, .../prometheus-operator,
// .../cert-manager), plus unknown fields, which those validators let through: each object is
// wrapped in a Proxy that records which fields the schema's validator reads; a field it
// never read (in an object whose keys it did not enumerate, as it does for maps such as
// labels) is unknown.
//   node validate.mjs FILE.yaml...      (multi-document YAML, e.g. `kubectl kustomize` output)
// Exit 1 naming every error, 0 when all objects are valid.
import { existsSync, readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

const modules = {
  "v1": "kubernetes-models/v1",
  "apps/v1": "kubernetes-models/apps/v1",
  "policy/v1": "kubernetes-models/policy/v1",
  "autoscaling/v2": "kubernetes-models/autoscaling/v2",
  "rbac.authorization.k8s.io/v1": "kubernetes-models/rbac.authorization.k8s.io/v1",
  "keda.sh/v1alpha1": "@kubernetes-models/keda/keda.sh/v1alpha1",
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
  "cert-manager.io/v1": "@kubernetes-models/cert-manager/cert-manager.io/v1",
};

function track(value, seen) {
  if (value === null || typeof value !== "object") return value;
  if (Array.isArray(value)) return value.map((v) => track(v, seen));
  const info = { read: new Set(), enumerated: false };
  seen.set(value, info);
  const wrapped = {};
  for (const [k, v] of Object.entries(value)) wrapped[k] = track(v, seen);
  return new Proxy(wrapped, {
    get(t, p, r) {
      if (typeof p === "string") info.read.add(p);
      return Reflect.get(t, p, r);
    },
    has(t, p) {
      if (typeof p === "string") info.read.add(p);
      return Reflect.has(t, p);
    },
    ownKeys(t) {
      info.enumerated = true;
      return Reflect.ownKeys(t);
    },
    getOwnPropertyDescriptor(t, p) {
      return Reflect.getOwnPropertyDescriptor(t, p);
    },
  });
}

function unknownFields(value, seen, path, out) {
  if (value === null || typeof value !== "object") return;
  if (Array.isArray(value)) {
    value.forEach((v, i) => unknownFields(v, seen, `${path}[${i}]`, out));
    return;
  }
  const info = seen.get(value);
  for (const [k, v] of Object.entries(value)) {
    if (info && !info.enumerated && !info.read.has(k)) out.push(`${path}.${k}: unknown field`);
    else unknownFields(v, seen, `${path}.${k}`, out);
  }
}

let errors = 0;
const objects = [];
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    if (doc.errors.length) {
      console.error(`${file}: ${doc.errors[0].message}`);
      errors++;
      continue;
    }
    const obj = doc.toJS();
    if (obj === null) continue;
    const where = `${file}: ${obj.kind ?? "?"} ${obj.metadata?.name ?? "?"}`;
    const mod = modules[obj.apiVersion];
    if (!mod) {
      console.error(`${where}: apiVersion ${obj.apiVersion} has no schema here`);
      errors++;
      continue;
    }
    // The kind's compiled schema validator, called on the tracked object itself (the
    // model classes copy their input, which would hide what the validator reads).
    let validator;
    try {
      // The ES module of the kind's class (.mjs where a package ships both) names it.
      const base = `node_modules/${mod}/${obj.kind}`;
      const file = [".mjs", ".js"].map((x) => new URL(base + x, import.meta.url)).find(existsSync);
      const rel = /from"(\.[^"]*_schemas\/[^"]*)"/.exec(readFileSync(file, "utf8"));
      validator = (await import(new URL(rel[1], file).href)).validate;
    } catch {
      console.error(`${where}: no kind ${obj.kind} in ${obj.apiVersion}`);
      errors++;
      continue;
    }
    const seen = new Map();
    const problems = [];
    if (!validator(track(obj, seen))) {
      for (const e of validator.errors) {
        problems.push(`${e.instancePath || "/"} ${e.keyword}: ${JSON.stringify(e.params)}`);
      }
    }
    unknownFields(obj, seen, "", problems);
    objects.push(obj);
    for (const p of problems) console.error(`${where}: ${p}`);
    errors += problems.length;
  }
}
// Consistency the schemas cannot see: probes on ports the container exposes, Services
// whose targetPort names a port of the pods they select.
function podTemplate(o) {
  if (["Deployment", "StatefulSet", "DaemonSet"].includes(o.kind)) return o.spec?.template;
  if (o.kind === "Pod") return o;
  return null;
}
const workloads = objects.filter(podTemplate);
for (const w of workloads) {
  const t = podTemplate(w);
  for (const c of t.spec?.containers ?? []) {
    const ports = new Set();
    for (const p of c.ports ?? []) {
      ports.add(p.containerPort);
      if (p.name) ports.add(p.name);
    }
    for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
      const pr = c[probe];
      if (!pr) continue;
      const port = pr.grpc?.port ?? pr.httpGet?.port ?? pr.tcpSocket?.port;
      if (port !== undefined && !ports.has(port)) {
        console.error(`${w.kind} ${w.metadata.name}: container ${c.name}: ${probe} on port ${port}, which the container does not expose`);
        errors++;
      }
    }
  }
}
for (const svc of objects.filter((o) => o.kind === "Service")) {
  const sel = svc.spec?.selector ?? {};
  const pods = workloads.filter((w) => {
    const labels = podTemplate(w).metadata?.labels ?? {};
    return Object.entries(sel).every(([k, v]) => labels[k] === v);
  });
  if (Object.keys(sel).length && !pods.length) {
    console.error(`Service ${svc.metadata.name}: selects no pod template`);
    errors++;
    continue;
  }
  for (const sp of svc.spec?.ports ?? []) {
    const target = sp.targetPort ?? sp.port;
    const ok = pods.every((w) =>
      (podTemplate(w).spec?.containers ?? []).some((c) =>
        (c.ports ?? []).some((p) => p.name === target || p.containerPort === target)));
    if (!ok) {
      console.error(`Service ${svc.metadata.name}: port ${sp.name ?? sp.port} targets ${target}, which a pod it selects does not expose`);
      errors++;
    }
  }
}
if (errors) {
  console.error(`${errors} error(s)`);
  process.exit(1);
}
console.log("all objects valid");
