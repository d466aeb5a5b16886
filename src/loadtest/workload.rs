//! What the load test sends, free of I/O: the request mix, the order of request
//! kinds, which (group size, concurrency) cells are measured, and the bodies.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use serde_json::{json, Value};
use thiserror::Error;

/// The default mix: mostly member PATCHes, some reads, some passthrough.
pub const DEFAULT_MIX: &str = "patch=70,read=10,summary=10,passthrough=10";

/// Longest kind schedule; weights are reduced by their common divisor first, so
/// only odd mixes like `patch=9999,read=9998` come near it.
const MAX_SCHEDULE_LEN: u32 = 10_000;

/// One kind of request of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestKind {
    /// `PATCH Group/{id}`: a `test`-pinned member's `inactive` is toggled, so
    /// the group keeps its size and the patch applies on both targets.
    Patch,
    /// `GET Group/{id}` with the whole roster.
    Read,
    /// `GET Group/{id}?_summary=true`.
    Summary,
    /// `GET Patient/{id}`: forwarded unchanged by the proxy.
    Passthrough,
}

impl RequestKind {
    pub const ALL: [RequestKind; 4] = [
        RequestKind::Patch,
        RequestKind::Read,
        RequestKind::Summary,
        RequestKind::Passthrough,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RequestKind::Patch => "patch",
            RequestKind::Read => "read",
            RequestKind::Summary => "summary",
            RequestKind::Passthrough => "passthrough",
        }
    }
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MixError {
    #[error("mix entry {0:?} is not kind=weight (e.g. patch=70)")]
    NotKindWeight(String),
    #[error("unknown request kind {0:?} in the mix (use patch, read, summary, passthrough)")]
    UnknownKind(String),
    #[error("weight {weight:?} of {kind} is not a whole number")]
    BadWeight { kind: RequestKind, weight: String },
    #[error("{0} is listed twice in the mix")]
    Repeated(RequestKind),
    #[error("the mix has no request kind with a weight above 0")]
    Empty,
    #[error("the mix weights are too fine-grained (their schedule would exceed {MAX_SCHEDULE_LEN} requests); use smaller weights")]
    TooFine,
}

/// Relative weights of request kinds, e.g. `patch=70,read=20,passthrough=10`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    /// Kinds with a weight above 0, in the order given.
    weights: Vec<(RequestKind, u32)>,
}

impl Mix {
    pub fn weights(&self) -> &[(RequestKind, u32)] {
        &self.weights
    }

    /// One cycle of request kinds, each kind as often as its (reduced) weight,
    /// spread evenly (smooth weighted round-robin): a run of any length sees
    /// the mix, not 70 PATCHes followed by 30 reads.
    pub fn schedule(&self) -> Vec<RequestKind> {
        let divisor = self.weights.iter().fold(0, |g, &(_, w)| gcd(g, w));
        let reduced: Vec<(RequestKind, i64)> = self
            .weights
            .iter()
            .map(|&(kind, w)| (kind, i64::from(w / divisor)))
            .collect();
        let total: i64 = reduced.iter().map(|&(_, w)| w).sum();
        let mut credit = vec![0i64; reduced.len()];
        let mut schedule = Vec::with_capacity(usize::try_from(total).unwrap_or_default());
        for _ in 0..total {
            for (c, &(_, w)) in credit.iter_mut().zip(&reduced) {
                *c += w;
            }
            let best = (0..reduced.len())
                .max_by_key(|&i| (credit[i], std::cmp::Reverse(i)))
                .unwrap_or_default();
            credit[best] -= total;
            schedule.push(reduced[best].0);
        }
        schedule
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl FromStr for Mix {
    type Err = MixError;

    fn from_str(text: &str) -> Result<Self, MixError> {
        let mut weights: Vec<(RequestKind, u32)> = Vec::new();
        let mut listed = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, weight) = entry
                .split_once('=')
                .ok_or_else(|| MixError::NotKindWeight(entry.to_string()))?;
            let kind = RequestKind::ALL
                .into_iter()
                .find(|k| k.name() == name.trim())
                .ok_or_else(|| MixError::UnknownKind(name.trim().to_string()))?;
            let weight: u32 = weight.trim().parse().map_err(|_| MixError::BadWeight {
                kind,
                weight: weight.trim().to_string(),
            })?;
            if listed.contains(&kind) {
                return Err(MixError::Repeated(kind));
            }
            listed.push(kind);
            if weight > 0 {
                weights.push((kind, weight));
            }
        }
        if weights.is_empty() {
            return Err(MixError::Empty);
        }
        let divisor = weights.iter().fold(0, |g, &(_, w)| gcd(g, w));
        let cycle: u64 = weights.iter().map(|&(_, w)| u64::from(w / divisor)).sum();
        if cycle > u64::from(MAX_SCHEDULE_LEN) {
            return Err(MixError::TooFine);
        }
        Ok(Mix { weights })
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<String> = self
            .weights
            .iter()
            .map(|(kind, weight)| format!("{kind}={weight}"))
            .collect();
        f.write_str(&entries.join(","))
    }
}

/// One measured point: every worker hits the same Group of `group_size` members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Cell {
    pub group_size: usize,
    pub concurrency: usize,
}

/// The cells to measure. By default a cross: every group size at one
/// concurrency, and every concurrency at one group size (the middle values of
/// the lists), which is what the chart shows and keeps the run short; the full
/// matrix measures every pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Concurrency at which latency is charted against group size.
    pub size_sweep_concurrency: usize,
    /// Group size at which latency is charted against concurrency.
    pub concurrency_sweep_size: usize,
    /// Distinct cells, ordered by group size, then concurrency.
    pub cells: Vec<Cell>,
}

impl Plan {
    /// `None` when either list is empty.
    pub fn new(group_sizes: &[usize], concurrencies: &[usize], full_matrix: bool) -> Option<Plan> {
        let sizes = sorted_distinct(group_sizes);
        let concurrencies = sorted_distinct(concurrencies);
        let size_sweep_concurrency = *concurrencies.get(concurrencies.len() / 2)?;
        let concurrency_sweep_size = *sizes.get(sizes.len() / 2)?;
        let mut cells: Vec<Cell> = if full_matrix {
            sizes
                .iter()
                .flat_map(|&group_size| {
                    concurrencies.iter().map(move |&concurrency| Cell {
                        group_size,
                        concurrency,
                    })
                })
                .collect()
        } else {
            let by_size = sizes.iter().map(|&group_size| Cell {
                group_size,
                concurrency: size_sweep_concurrency,
            });
            let by_concurrency = concurrencies.iter().map(|&concurrency| Cell {
                group_size: concurrency_sweep_size,
                concurrency,
            });
            by_size.chain(by_concurrency).collect()
        };
        cells.sort();
        cells.dedup();
        Some(Plan {
            size_sweep_concurrency,
            concurrency_sweep_size,
            cells,
        })
    }

    /// The distinct group sizes the plan needs a Group of.
    pub fn group_sizes(&self) -> Vec<usize> {
        sorted_distinct(&self.cells.iter().map(|c| c.group_size).collect::<Vec<_>>())
    }
}

fn sorted_distinct(values: &[usize]) -> Vec<usize> {
    let mut values = values.to_vec();
    values.sort_unstable();
    values.dedup();
    values
}

/// The reference of the `index`-th member of a benchmark Group.
pub fn member_reference(index: usize) -> String {
    format!("Patient/bench-{index}")
}

fn member(index: usize) -> Value {
    json!({"entity": {"reference": member_reference(index)}})
}

/// What the reference server (icanbwell/fhir-server) requires of every
/// write: a `meta.source` and an owner tag (plus the access tag its
/// `access/*.*` scopes are checked against). Plain FHIR to other servers.
fn with_owner(mut resource: Value) -> Value {
    resource["meta"] = json!({
        "source": "https://fhir-group-proxy.bench/source",
        "security": [
            {"system": "https://www.icanbwell.com/owner", "code": "bench"},
            {"system": "https://www.icanbwell.com/access", "code": "bench"}
        ]
    });
    resource
}

/// A Group with members `0..size` inline, as the legacy server stores it.
/// With no members it still has the (empty) array: RFC 6902 appends
/// (`add /member/-`) only to an array that exists.
pub fn group_with_members(size: usize) -> Value {
    let mut group = with_owner(json!({"resourceType": "Group", "type": "person", "actual": true}));
    group["member"] = (0..size).map(member).collect();
    group
}

/// A member PATCH adding members `range` (to seed a Group through the proxy).
pub fn add_members_patch(range: std::ops::Range<usize>) -> Value {
    range
        .map(|i| json!({"op": "add", "path": "/member/-", "value": member(i)}))
        .collect()
}

/// The member PATCH of the `sequence`-th PATCH of a cell on a Group of
/// `group_size` members: pins the member at a position with `test` (the proxy
/// needs it, the legacy server checks it) and sets its `inactive`. Walking the
/// positions and alternating the value changes every time and keeps the group
/// size constant, so a cell measures the size it says.
pub fn toggle_inactive_patch(sequence: u64, group_size: usize) -> Value {
    let size = group_size.max(1) as u64;
    let index = usize::try_from(sequence % size).unwrap_or_default();
    let inactive = (sequence / size).is_multiple_of(2);
    json!([
        {"op": "test", "path": format!("/member/{index}/entity/reference"), "value": member_reference(index)},
        {"op": "add", "path": format!("/member/{index}/inactive"), "value": inactive}
    ])
}

/// The resource read by passthrough requests.
pub fn passthrough_patient() -> Value {
    with_owner(
        json!({"resourceType": "Patient", "name": [{"family": "Bench", "given": ["Passthrough"]}]}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_kinds_and_weights() {
        let mix: Mix = "patch=70, read=20,passthrough=10".parse().unwrap();
        assert_eq!(
            mix.weights(),
            &[
                (RequestKind::Patch, 70),
                (RequestKind::Read, 20),
                (RequestKind::Passthrough, 10)
            ]
        );
        assert_eq!(mix.to_string(), "patch=70,read=20,passthrough=10");
        let default: Mix = DEFAULT_MIX.parse().unwrap();
        assert_eq!(default.to_string(), DEFAULT_MIX);
    }

    #[test]
    fn zero_weights_are_left_out() {
        let mix: Mix = "patch=0,read=1".parse().unwrap();
        assert_eq!(mix.weights(), &[(RequestKind::Read, 1)]);
    }

    #[test]
    fn bad_mixes_say_what_is_wrong() {
        let cases = [
            ("patch", MixError::NotKindWeight("patch".into())),
            ("write=3", MixError::UnknownKind("write".into())),
            (
                "patch=7.5",
                MixError::BadWeight {
                    kind: RequestKind::Patch,
                    weight: "7.5".into(),
                },
            ),
            ("read=1,read=2", MixError::Repeated(RequestKind::Read)),
            ("patch=0", MixError::Empty),
            ("", MixError::Empty),
            ("patch=9999,read=9998", MixError::TooFine),
        ];
        for (text, expected) in cases {
            assert_eq!(text.parse::<Mix>(), Err(expected), "{text}");
        }
    }

    #[test]
    fn schedule_holds_each_kind_by_weight_and_interleaves_them() {
        let mix: Mix = "patch=70,read=10,summary=10,passthrough=10"
            .parse()
            .unwrap();
        let schedule = mix.schedule();
        assert_eq!(schedule.len(), 10, "weights reduced by their divisor");
        let count = |kind| schedule.iter().filter(|&&k| k == kind).count();
        assert_eq!(count(RequestKind::Patch), 7);
        assert_eq!(count(RequestKind::Read), 1);
        assert_eq!(count(RequestKind::Summary), 1);
        assert_eq!(count(RequestKind::Passthrough), 1);

        let schedule = "patch=1,read=1".parse::<Mix>().unwrap().schedule();
        assert_eq!(schedule, vec![RequestKind::Patch, RequestKind::Read]);
        let schedule = "patch=2,read=3".parse::<Mix>().unwrap().schedule();
        let longest_run = schedule
            .windows(2)
            .filter(|w| w[0] == RequestKind::Patch && w[1] == RequestKind::Patch)
            .count();
        assert_eq!(longest_run, 0, "PATCHes are spread out: {schedule:?}");
    }

    #[test]
    fn default_plan_is_a_cross_through_the_middle_values() {
        let plan = Plan::new(&[10_000, 100, 1_000], &[1, 8, 32], false).unwrap();
        assert_eq!(plan.size_sweep_concurrency, 8);
        assert_eq!(plan.concurrency_sweep_size, 1_000);
        let cells: Vec<(usize, usize)> = plan
            .cells
            .iter()
            .map(|c| (c.group_size, c.concurrency))
            .collect();
        assert_eq!(
            cells,
            vec![(100, 8), (1_000, 1), (1_000, 8), (1_000, 32), (10_000, 8)]
        );
        assert_eq!(plan.group_sizes(), vec![100, 1_000, 10_000]);
    }

    #[test]
    fn full_matrix_measures_every_pair() {
        let plan = Plan::new(&[10, 20], &[1, 2, 2], true).unwrap();
        assert_eq!(plan.cells.len(), 4);
        assert!(Plan::new(&[], &[1], false).is_none());
        assert!(Plan::new(&[1], &[], true).is_none());
    }

    #[test]
    fn toggle_patches_walk_members_and_alternate() {
        let first = toggle_inactive_patch(0, 3);
        assert_eq!(first[0]["path"], "/member/0/entity/reference");
        assert_eq!(first[0]["value"], "Patient/bench-0");
        assert_eq!(first[1]["path"], "/member/0/inactive");
        assert_eq!(first[1]["value"], true);
        let fourth = toggle_inactive_patch(3, 3);
        assert_eq!(fourth[1]["path"], "/member/0/inactive");
        assert_eq!(fourth[1]["value"], false);
        assert_eq!(toggle_inactive_patch(5, 3)[1]["path"], "/member/2/inactive");
    }

    #[test]
    fn seeding_bodies_name_the_same_members() {
        let group = group_with_members(3);
        let patch = add_members_patch(0..3);
        for i in 0..3 {
            assert_eq!(group["member"][i], patch[i]["value"]);
        }
        assert_eq!(group_with_members(0)["member"], json!([]));
    }
}
