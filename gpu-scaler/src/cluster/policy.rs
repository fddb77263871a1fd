//! What a node that does not answer counts as.
//!
//! `average` (the default): when at least half of the workload's pods reported,
//! each pod that did not report counts as the average of the pods that did, so
//! one slow node neither scales the workload down (as a zero would) nor stalls
//! scaling; with fewer reports the answer is UNAVAILABLE. `fail`: any pod without
//! a report makes the answer UNAVAILABLE. KEDA keeps the last replica count while
//! a scaler is UNAVAILABLE.

use super::{Error, Result};

/// `--missing-node-policy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MissingNodePolicy {
    /// Count missing pods as the average of the reported ones if at least half of
    /// the workload's pods reported; otherwise UNAVAILABLE.
    #[default]
    Average,
    /// Any missing pod makes the answer UNAVAILABLE.
    Fail,
}

impl MissingNodePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Average => "average",
            Self::Fail => "fail",
        }
    }

    /// Decides, from counts alone, whether an answer with `missing` of `total`
    /// pods unreported may be given. `Ok(n)`: count `n` pods as the average of the
    /// reported ones.
    pub fn admit(self, total: usize, missing: usize) -> Result<usize> {
        if missing == 0 {
            return Ok(0);
        }
        let reported = total - missing;
        match self {
            Self::Fail => Err(Error::Unreported { missing, total }),
            Self::Average if reported > 0 && reported * 2 >= total => Ok(missing),
            Self::Average => Err(Error::TooFewReported { reported, total }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn average_needs_half_the_pods() {
        let p = MissingNodePolicy::Average;
        assert_eq!(p.admit(4, 0).expect("all reported"), 0);
        assert_eq!(p.admit(4, 2).expect("half reported"), 2);
        assert_eq!(p.admit(3, 1).expect("two of three"), 1);
        let e = p.admit(3, 2).expect_err("one of three");
        assert!(e.to_string().contains("only 1 of 3"), "{e}");
        assert!(
            p.admit(2, 2).is_err(),
            "nothing reported is never an answer"
        );
    }

    #[test]
    fn fail_refuses_any_gap() {
        assert_eq!(MissingNodePolicy::Fail.admit(5, 0).expect("complete"), 0);
        let e = MissingNodePolicy::Fail.admit(5, 1).expect_err("gap");
        assert!(e.to_string().contains("1 of 5"), "{e}");
    }
}
