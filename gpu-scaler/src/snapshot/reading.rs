//! [`Reading`]: a figure that was read, or why it could not be.
//!
//! Every figure the daemon serves is one; the arithmetic on them (sums over
//! processes, pods and containers; unit conversions) lives here once, so no
//! caller can turn a reading it could not take into a zero: a wrong zero
//! scales a workload away.

use std::{ops::Add, sync::Arc};

use serde::{Deserialize, Serialize};

/// A figure that was read, or the reason it could not be. Serialized as
/// `{"ok": v}` or `{"unavailable": "why"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reading<T> {
    Ok(T),
    Unavailable(Arc<str>),
}

impl<T: Copy> Reading<T> {
    pub fn ok(&self) -> Option<T> {
        match self {
            Self::Ok(v) => Some(*v),
            Self::Unavailable(_) => None,
        }
    }

    /// The figure converted by `f`; an unavailable one keeps its reason.
    pub fn map<U>(&self, f: impl FnOnce(T) -> U) -> Reading<U> {
        match self {
            Self::Ok(v) => Reading::Ok(f(*v)),
            Self::Unavailable(r) => Reading::Unavailable(r.clone()),
        }
    }
}

impl<T: Copy + Add<Output = T>> Reading<T> {
    /// The sum of two readings; an unavailable one makes the sum unavailable,
    /// with the first reason.
    pub fn plus(&self, other: &Self) -> Self {
        match (self, other) {
            (Self::Ok(a), Self::Ok(b)) => Self::Ok(*a + *b),
            (Self::Unavailable(r), _) | (_, Self::Unavailable(r)) => Self::Unavailable(r.clone()),
        }
    }

    /// Adds `next` to a running sum that is `None` before its first term.
    pub fn accumulate(sum: &mut Option<Self>, next: &Self) {
        *sum = Some(match sum.take() {
            None => next.clone(),
            Some(s) => s.plus(next),
        });
    }
}

impl Reading<u64> {
    /// As a float (exact below 2^53).
    pub fn as_f64(&self) -> Reading<f64> {
        self.map(|v| v as f64)
    }
}

impl<T> Reading<T> {
    pub fn unavailable(reason: impl Into<Arc<str>>) -> Self {
        Self::Unavailable(reason.into())
    }

    /// Why the figure could not be read; `None` when it was.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Ok(_) => None,
            Self::Unavailable(r) => Some(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sum_is_unavailable_with_the_first_reason() {
        let a = Reading::Ok(2u64);
        let b: Reading<u64> = Reading::unavailable("lost");
        let c: Reading<u64> = Reading::unavailable("mig");
        assert_eq!(a.plus(&Reading::Ok(3)), Reading::Ok(5));
        assert_eq!(a.plus(&b).reason(), Some("lost"));
        assert_eq!(b.plus(&c).reason(), Some("lost"));
        assert_eq!(c.plus(&a).reason(), Some("mig"));
        let mut sum = None;
        for r in [&a, &Reading::Ok(1), &b, &Reading::Ok(4)] {
            Reading::accumulate(&mut sum, r);
        }
        assert_eq!(sum.expect("four terms").reason(), Some("lost"));
        let mut sum = None;
        Reading::accumulate(&mut sum, &a);
        assert_eq!(sum, Some(Reading::Ok(2)));
    }

    #[test]
    fn conversions_keep_the_reason() {
        assert_eq!(Reading::Ok(7u64).as_f64(), Reading::Ok(7.0));
        assert_eq!(Reading::Ok(7u32).map(f64::from), Reading::Ok(7.0));
        let r: Reading<u32> = Reading::unavailable("MIG");
        assert_eq!(r.map(f64::from).reason(), Some("MIG"));
    }

    #[test]
    fn serialized_form_round_trips() {
        let ok = serde_json::to_string(&Reading::Ok(1.5)).expect("serializes");
        assert_eq!(ok, r#"{"ok":1.5}"#);
        let r: Reading<f64> = serde_json::from_str(r#"{"unavailable":"gone"}"#).expect("parses");
        assert_eq!(r.reason(), Some("gone"));
    }
}
