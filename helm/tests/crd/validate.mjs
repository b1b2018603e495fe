// Validates custom resources (JSON array on stdin) with the models generated from their
// projects' API types; prints one JSON line per object: {"kind", "name", "errors"}.
import { Certificate } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const models = {
  "cert-manager.io/v1/Certificate": Certificate,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
for (const obj of JSON.parse(input)) {
  const Model = models[`${obj.apiVersion}/${obj.kind}`];
  let errors = [];
  if (!Model) {
    errors = [`no model for ${obj.apiVersion} ${obj.kind}`];
  } else {
    try {
      new Model(obj).validate();
    } catch (e) {
      errors = [String(e.message || e)];
    }
  }
  console.log(JSON.stringify({ kind: obj.kind, name: obj.metadata?.name, errors }));
}
