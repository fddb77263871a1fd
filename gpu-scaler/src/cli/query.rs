//! `gpu-scaler query`: call a running scaler the way KEDA does (GetMetricSpec,
//! GetMetrics with the spec's name, IsActive, within KEDA's 3 s deadline) and
//! show what the HPA would do with the answer.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::scaler::{
    hpa::{self, TargetType},
    proto::{GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient},
};
use crate::tls;

#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// The scaler's gRPC address (`host:port`, `http://...` or `https://...`).
    #[arg(long, default_value = "http://127.0.0.1:6000")]
    pub address: String,
    /// The ScaledObject's namespace.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// The ScaledObject's name.
    #[arg(long, default_value = "gpu-scaler-query")]
    pub name: String,
    /// Scaler metadata as KEY=VALUE pairs, as in the ScaledObject's trigger.
    pub metadata: Vec<String>,
    /// The workload's current replica count.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// The trigger's metricType.
    #[arg(long, value_enum, default_value_t)]
    pub metric_type: TargetType,
    /// The ScaledObject's minReplicaCount.
    #[arg(long, default_value_t = 0)]
    pub min_replicas: u32,
    /// The ScaledObject's maxReplicaCount.
    #[arg(long, default_value_t = 100)]
    pub max_replicas: u32,
    /// PEM CA that signed the scaler's certificate (enables TLS).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mTLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name to verify the scaler's certificate against (default: the address's host).
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A TLS file `query` could not read: a usage error naming it.
fn usage(e: tls::Error) -> super::Error {
    super::Error::Usage(e.to_string())
}

/// Parses `KEY=VALUE` pairs; a value may contain `=` (selectors do).
pub fn parse_metadata(pairs: &[String]) -> super::Result<HashMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| super::Error::Usage(format!("metadata {p:?} is not KEY=VALUE")))
        })
        .collect()
}

async fn connect(args: &QueryArgs) -> super::Result<Channel> {
    let tls = args.tls_ca.is_some() || args.tls_cert.is_some();
    let address = if args.address.contains("://") {
        args.address.clone()
    } else {
        format!("{}://{}", if tls { "https" } else { "http" }, args.address)
    };
    let mut endpoint = Endpoint::from_shared(address.clone())
        .map_err(|e| super::Error::Usage(format!("address {address:?}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3));
    if tls {
        let mut cfg = ClientTlsConfig::new();
        if let Some(ca) = &args.tls_ca {
            cfg = cfg.ca_certificate(tls::certificate(ca).map_err(usage)?);
        }
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            cfg = cfg.identity(tls::identity(cert, key).map_err(usage)?);
        }
        if let Some(name) = &args.tls_server_name {
            cfg = cfg.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(cfg)
            .map_err(|e| super::Error::Usage(format!("TLS settings: {e}")))?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| super::Error::Rpc(format!("connecting to {address}: {e:?}")))
}

fn rpc(what: &str, status: tonic::Status) -> super::Error {
    super::Error::Rpc(format!("{what}: {:?}: {}", status.code(), status.message()))
}

/// What KEDA would get and the HPA would do with it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Answer {
    pub metric_name: String,
    /// The target KEDA uses (the float field when > 0, else the int field).
    pub target: f64,
    pub target_size: i64,
    pub target_size_float: f64,
    /// The value KEDA uses, chosen the same way.
    pub value: f64,
    pub metric_value: i64,
    pub metric_value_float: f64,
    pub active: bool,
    pub metric_type: String,
    pub current_replicas: u32,
    pub desired_replicas: u32,
}

/// Asks the scaler as KEDA does: GetMetricSpec, GetMetrics with the spec's
/// name, IsActive; then applies the HPA arithmetic.
pub async fn ask(args: &QueryArgs) -> super::Result<Answer> {
    let scaler_metadata = parse_metadata(&args.metadata)?;
    let mut client = ExternalScalerClient::new(connect(args).await?);
    let object = ScaledObjectRef {
        name: args.name.clone(),
        namespace: args.namespace.clone(),
        scaler_metadata,
    };

    let spec = client
        .get_metric_spec(object.clone())
        .await
        .map_err(|s| rpc("GetMetricSpec", s))?
        .into_inner();
    let [spec] = &spec.metric_specs[..] else {
        return Err(super::Error::Rpc(format!(
            "GetMetricSpec returned {} specs; expected exactly one",
            spec.metric_specs.len()
        )));
    };

    let metrics = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object.clone()),
            metric_name: spec.metric_name.clone(),
        })
        .await
        .map_err(|s| rpc("GetMetrics", s))?
        .into_inner();
    let [value] = &metrics.metric_values[..] else {
        return Err(super::Error::Rpc(format!(
            "GetMetrics returned {} values; expected exactly one",
            metrics.metric_values.len()
        )));
    };

    let active = client
        .is_active(object)
        .await
        .map_err(|s| rpc("IsActive", s))?
        .into_inner()
        .result;

    // KEDA uses the float fields when they are > 0, the int fields otherwise.
    let v = if value.metric_value_float > 0.0 {
        value.metric_value_float
    } else {
        value.metric_value as f64
    };
    let target = if spec.target_size_float > 0.0 {
        spec.target_size_float
    } else {
        spec.target_size as f64
    };
    let policy = hpa::Policy {
        target_type: args.metric_type,
        min: args.min_replicas,
        max: args.max_replicas,
        tolerance: 0.1,
    };
    Ok(Answer {
        metric_name: spec.metric_name.clone(),
        target,
        target_size: spec.target_size,
        target_size_float: spec.target_size_float,
        value: v,
        metric_value: value.metric_value,
        metric_value_float: value.metric_value_float,
        active,
        metric_type: format!("{:?}", args.metric_type),
        current_replicas: args.replicas,
        desired_replicas: hpa::desired_replicas(&policy, args.replicas, v, target, active),
    })
}

/// Why a trigger can never leave zero replicas, if it cannot: at zero the
/// workload has no pod, so its own signals are 0 and IsActive stays false.
pub fn stuck_at_zero(metadata: &HashMap<String, String>, min_replicas: u32) -> Option<String> {
    (min_replicas == 0 && !metadata.contains_key("activationPodSelector")).then(|| {
        "warning: with minReplicaCount 0 this trigger can never activate: at zero replicas \
         the workload has no pod to measure, so IsActive stays false. Add \
         activationPodSelector (+ activationMetric) naming pods that exist while it is at \
         zero (a router or gateway), or another trigger that can activate it."
            .to_owned()
    })
}

pub async fn run(args: QueryArgs) -> super::Result<()> {
    if let Some(w) = stuck_at_zero(&parse_metadata(&args.metadata)?, args.min_replicas) {
        eprintln!("{w}");
    }
    let a = ask(&args).await?;
    if args.json {
        let out = serde_json::to_string(&a).map_err(|e| super::Error::Rpc(e.to_string()))?;
        println!("{out}");
    } else {
        println!(
            "spec:     {}  target {} (targetSize {}, targetSizeFloat {})",
            a.metric_name, a.target, a.target_size, a.target_size_float
        );
        println!(
            "value:    {}  (metricValue {}, metricValueFloat {})",
            a.value, a.metric_value, a.metric_value_float
        );
        println!("active:   {}", a.active);
        println!(
            "replicas: {} -> {}  ({}, tolerance 0.1, min {}, max {})",
            a.current_replicas,
            a.desired_replicas,
            a.metric_type,
            args.min_replicas,
            args.max_replicas
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_pairs() {
        let m = parse_metadata(&[
            "podSelector=app=vllm,tier in (a,b)".into(),
            "targetValue=5".into(),
        ])
        .expect("valid");
        assert_eq!(m["podSelector"], "app=vllm,tier in (a,b)");
        assert_eq!(m["targetValue"], "5");
        let err = parse_metadata(&["nokey".into()]).expect_err("no =");
        assert!(err.to_string().contains("nokey"), "{err}");
    }

    #[test]
    fn warns_when_a_trigger_can_never_activate() {
        let own = parse_metadata(&["podSelector=app=vllm".into()]).expect("valid");
        assert!(stuck_at_zero(&own, 0).is_some_and(|w| w.contains("activationPodSelector")));
        assert!(stuck_at_zero(&own, 1).is_none());
        let routed = parse_metadata(&[
            "podSelector=app=vllm".into(),
            "activationPodSelector=app=router".into(),
        ])
        .expect("valid");
        assert!(stuck_at_zero(&routed, 0).is_none());
    }
}
