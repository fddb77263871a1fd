//! What the HPA (behind KEDA) does with a metric: the replica arithmetic, for
//! `gpu-scaler query`, the demo and the tests.
//!
//! Kubernetes' replica calculator for an external metric: with `AverageValue`
//! the usage ratio is `value / (target * current)`; with `Value` it is
//! `value / target`. Within the tolerance (0.1 by default) the count stays;
//! otherwise it becomes `ceil(value / target)` (AverageValue) or
//! `ceil(ratio * current)` (Value), clamped to [min, max]. KEDA adds the
//! zero step: inactive scales to zero when minReplicaCount is 0, and active at
//! zero scales to max(1, min).

/// The trigger's `metricType` (the HPA metric target type).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetType {
    #[default]
    #[value(name = "AverageValue")]
    AverageValue,
    #[value(name = "Value")]
    Value,
}

/// The HPA's and KEDA's replica bounds and tolerance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    pub target_type: TargetType,
    /// minReplicaCount (0 allows scale to zero).
    pub min: u32,
    pub max: u32,
    pub tolerance: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            target_type: TargetType::AverageValue,
            min: 0,
            max: 100,
            tolerance: 0.1,
        }
    }
}

/// The replicas after one evaluation, from `current`.
pub fn desired_replicas(
    policy: &Policy,
    current: u32,
    value: f64,
    target: f64,
    active: bool,
) -> u32 {
    let floor = policy.min.max(1);
    if !active && policy.min == 0 {
        return 0;
    }
    if current == 0 {
        return floor.min(policy.max);
    }
    let cur = f64::from(current);
    let (ratio, proposal) = match policy.target_type {
        TargetType::AverageValue => (value / (target * cur), (value / target).ceil()),
        TargetType::Value => (value / target, (value / target * cur).ceil()),
    };
    let desired = if (ratio - 1.0).abs() <= policy.tolerance {
        current
    } else {
        proposal.clamp(0.0, f64::from(u32::MAX)) as u32
    };
    desired.clamp(floor, policy.max.max(floor))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        target_type: TargetType::AverageValue,
        min: 0,
        max: 10,
        tolerance: 0.1,
    };

    #[test]
    fn average_value() {
        assert_eq!(desired_replicas(&P, 1, 250.0, 80.0, true), 4);
        assert_eq!(desired_replicas(&P, 4, 250.0, 80.0, true), 4);
        // 330 / (80*4) = 1.03: within tolerance, stays.
        assert_eq!(desired_replicas(&P, 4, 330.0, 80.0, true), 4);
        // 360 / 320 = 1.125: outside, ceil(360/80) = 5.
        assert_eq!(desired_replicas(&P, 4, 360.0, 80.0, true), 5);
        assert_eq!(
            desired_replicas(&P, 4, 10_000.0, 80.0, true),
            10,
            "clamped to max"
        );
        assert_eq!(
            desired_replicas(&P, 4, 1.0, 80.0, true),
            1,
            "at least one while active"
        );
        assert_eq!(
            desired_replicas(&P, 4, 0.0, 80.0, false),
            0,
            "inactive scales to zero"
        );
        assert_eq!(
            desired_replicas(&P, 0, 50.0, 80.0, true),
            1,
            "active at zero wakes to one"
        );
        let min2 = Policy { min: 2, ..P };
        assert_eq!(
            desired_replicas(&min2, 4, 0.0, 80.0, false),
            2,
            "min > 0 never reaches zero"
        );
        assert_eq!(desired_replicas(&min2, 0, 50.0, 80.0, true), 2);
    }

    #[test]
    fn value_type() {
        let v = Policy {
            target_type: TargetType::Value,
            ..P
        };
        // A per-replica average of 90 against 60 on 2 replicas: ceil(1.5 * 2) = 3.
        assert_eq!(desired_replicas(&v, 2, 90.0, 60.0, true), 3);
        assert_eq!(desired_replicas(&v, 3, 62.0, 60.0, true), 3);
        assert_eq!(desired_replicas(&v, 3, 20.0, 60.0, true), 1);
    }
}
