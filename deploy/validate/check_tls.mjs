// The TLS settings of the rendered manifests against the Secrets deploy/k8s/make-dev-secrets.sh
// makes (deploy/k8s/check.sh runs this):
//   node check_tls.mjs MESH.yaml SECRETS.yaml CERT_MANAGER.yaml DEV_DIR DEV_SANS CLIENT_SANS
// MESH: deploy/k8s rendered; SECRETS: the script's output; CERT_MANAGER: deploy/k8s-cert-manager
// rendered; DEV_DIR: the script's --out folder; DEV_SANS, CLIENT_SANS: the subject
// alternative names of its tls.crt and client.crt, as openssl prints them without spaces
// ("DNS:a,DNS:b"). Checks that every component serves mutual TLS and requires the admin
// identity with files of those Secrets where the manifest mounts them (whole, read-only,
// 0440), dials expecting a name of the certificate, probes over HTTP on the metrics port;
// that the Secrets hold the files made; and that the cert-manager overlay's Certificate
// carries the same names and both usages. Exit 1 naming every problem.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

const load = (f) => parseAllDocuments(readFileSync(f, "utf8")).map((d) => d.toJS()).filter((d) => d);
const [mesh, secrets, cm] = process.argv.slice(2, 5).map(load);
const [dev, devSans, clientSans] = process.argv.slice(5);
let errors = 0;
const fail = (m) => {
  console.error(`error: ${m}`);
  errors++;
};

// The Secrets: the kubernetes.io/tls layout with ca.crt (cert-manager's), the files made.
const secret = (name) => secrets.find((o) => o.kind === "Secret" && o.metadata.name === name);
const tls = secret("moemesh-tls");
const token = secret("moemesh-admin-token");
if (tls?.type !== "kubernetes.io/tls") fail("no Secret moemesh-tls of type kubernetes.io/tls");
if (Object.keys(tls?.data ?? {}).sort().join() !== "ca.crt,tls.crt,tls.key") {
  fail("moemesh-tls: want the keys ca.crt, tls.crt and tls.key");
}
for (const k of ["ca.crt", "tls.crt", "tls.key"]) {
  if (tls?.data?.[k] !== readFileSync(`${dev}/${k}`).toString("base64")) {
    fail(`moemesh-tls: ${k} is not the file made`);
  }
}
if (!/^[0-9a-f]{64}\n?$/.test(Buffer.from(token?.data?.token ?? "", "base64").toString())) {
  fail("moemesh-admin-token: its token is not 32 random bytes in hex");
}
const names = devSans.split(",").map((s) => s.replace(/^DNS:/, "")).sort();
const clientNames = clientSans.split(",").map((s) => s.replace(/^DNS:/, "")).sort();

// Every component: TLS, mutual, the admin identity required, its files where mounted.
const fileFlags = {
  "--tls-cert": "moemesh-tls",
  "--tls-key": "moemesh-tls",
  "--tls-ca": "moemesh-tls",
  "--tls-client-ca": "moemesh-tls",
  "--admin-token-file": "moemesh-admin-token",
};
const workloads = mesh.filter((o) => ["Deployment", "StatefulSet"].includes(o.kind));
if (workloads.length !== 3) fail(`want 3 workloads, found ${workloads.length}`);
for (const w of workloads) {
  const spec = w.spec.template.spec;
  for (const c of spec.containers) {
    const where = `${w.kind} ${w.metadata.name}: container ${c.name}`;
    const flag = (f) => {
      const i = c.command.indexOf(f);
      return i < 0 ? undefined : c.command[i + 1];
    };
    for (const [f, secretName] of Object.entries(fileFlags)) {
      const path = flag(f);
      if (!path) {
        fail(`${where}: no ${f}`);
        continue;
      }
      const dir = path.slice(0, path.lastIndexOf("/"));
      const key = path.slice(path.lastIndexOf("/") + 1);
      const mount = (c.volumeMounts ?? []).find((m) => m.mountPath === dir);
      const vol = (spec.volumes ?? []).find((v) => v.name === mount?.name);
      // Whole (no subPath: a renewed Secret then shows in place), read-only.
      if (!mount?.readOnly || mount.subPath) fail(`${where}: ${f} ${path}: not in a whole read-only mount`);
      if (vol?.secret?.secretName !== secretName) {
        fail(`${where}: ${f} ${path}: not from the Secret ${secretName}`);
      } else if (!(key in (secret(secretName)?.data ?? {}))) {
        fail(`${where}: ${f} ${path}: the Secret ${secretName} has no key ${key}`);
      } else if (vol.secret.defaultMode !== 0o440) {
        fail(`${where}: the Secret ${secretName} is not mounted 0440 (defaultMode 288)`);
      }
    }
    for (const f of ["--tls-server-name", "--admin-san"]) {
      if (!names.includes(flag(f))) fail(`${where}: ${f} ${flag(f)} is not a name of the certificate`);
    }
    if (clientNames.includes(flag("--admin-san"))) {
      fail(`${where}: the client certificate names the admin SAN ${flag("--admin-san")}`);
    }
    // Probes over HTTP on the metrics port: the gRPC port speaks only TLS.
    const metrics = (c.ports ?? []).find((p) => p.name === "metrics");
    if (!metrics) fail(`${where}: no metrics port`);
    if (!c.readinessProbe || !c.livenessProbe) fail(`${where}: want readiness and liveness probes`);
    const want = { startupProbe: "/healthz", livenessProbe: "/healthz", readinessProbe: "/readyz" };
    for (const [probe, path] of Object.entries(want)) {
      const p = c[probe];
      if (!p) continue;
      const port = p.httpGet?.port;
      if (p.httpGet?.path !== path || (port !== metrics?.name && port !== metrics?.containerPort) ||
          (p.httpGet.scheme ?? "HTTP") !== "HTTP") {
        fail(`${where}: ${probe} is not an HTTP GET of ${path} on the metrics port`);
      }
    }
  }
}

// The cert-manager overlay: the Secret the base mounts, the same names, both usages.
const cert = cm.find((o) => o.kind === "Certificate" && o.spec?.secretName === "moemesh-tls");
if (!cert) {
  fail("k8s-cert-manager: no Certificate writes the Secret moemesh-tls");
} else {
  if ([...(cert.spec.dnsNames ?? [])].sort().join() !== names.join()) {
    fail(`k8s-cert-manager: the Certificate's dnsNames (${cert.spec.dnsNames}) are not ` +
         `make-dev-secrets.sh's (${names})`);
  }
  for (const u of ["server auth", "client auth"]) {
    if (!cert.spec.usages?.includes(u)) fail(`k8s-cert-manager: the Certificate lacks the usage ${u}`);
  }
  const ref = cert.spec.issuerRef;
  const issuer = cm.find((o) => o.kind === (ref.kind ?? "Issuer") && o.metadata.name === ref.name);
  if (!issuer?.spec?.ca?.secretName) fail("k8s-cert-manager: moemesh-tls's issuer is no CA Issuer of the overlay");
}
const client = cm.find((o) => o.kind === "Certificate" && o.metadata.name === "moemesh-client");
if ([...(client?.spec?.dnsNames ?? [])].sort().join() !== clientNames.join()) {
  fail("k8s-cert-manager: the client Certificate's names differ from make-dev-secrets.sh's");
}
if (!client?.spec?.usages?.includes("client auth")) fail("k8s-cert-manager: the client Certificate lacks client auth");

if (errors) {
  console.error(`${errors} TLS error(s)`);
  process.exit(1);
}
console.log(`TLS: ${workloads.length} workloads with mutual TLS and the admin token from the ` +
            `Secrets; the certificate's ${names.length} names as in the cert-manager Certificate`);
