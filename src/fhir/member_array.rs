//! Plans a JSON Patch (RFC 6902) on `Group.member` without loading the array.
//!
//! # Why this exists
//!
//! The legacy FHIR server applies a JSON Patch to the whole Group document,
//! so `member` behaves as an ordered JSON array: positions matter, duplicates
//! are allowed and every element is kept verbatim. Groups reach a million
//! members, so the proxy keeps the array in a store and cannot read it whole
//! for each patch. This module answers "what would the legacy server have
//! done?" while reading only the few stored elements the patch touches. It
//! does no I/O: the caller fetches the facts it asks for.
//!
//! # The slot model
//!
//! The array is stored as [`Slot`]s: an opaque, stable slot id, an order key
//! and the element JSON, kept byte for byte. The array is the slots sorted by
//! order key (plain bytewise string order, as a ClickHouse `String` column
//! sorts). An element's *position* is therefore not stored anywhere: it is
//! its rank, which the store can compute with a scan. The store can also
//! answer the length, the slots whose `entity.reference` equals a string, all
//! slots, and the *append floor*: a key at least as large as every key ever
//! assigned, so that appending only needs a key above it.
//!
//! A [`Plan`] is the net change to the slot set: at most one [`SlotEvent`]
//! per slot (a slot added and removed by the same patch leaves no trace), in
//! the order the patch first touched the slots, each with the element before
//! and after so counts can be kept without re-reading. Moves keep the slot id
//! and change the key; replacements and sub-element edits keep id and key.
//!
//! # The Need protocol and its round bound
//!
//! [`plan`] replays the patch against what the caller knows ([`Known`]).
//! Whatever it could not decide it returns as a [`Need`]; the caller fetches
//! those facts, adds them to `Known` and calls again, until it gets
//! [`Planned::Done`] or an error. Every `Need` names at least one fact the
//! caller does not yet have, so the loop ends.
//!
//! A patch is atomic, so the replay may assume every op succeeds: if one
//! fails, the patch fails whatever follows. The *shape* of the array (which
//! stored positions are gone, where new elements sit) then depends only on
//! the indexes written in the patch and on the length, never on element
//! values. So the first round, before even the length is known, replays the
//! patch as if the array were endless and asks, together with the length and
//! the floor, for every position that replay reaches, for the references of
//! all by-reference removals and, if the patch has a whole-array op, for all
//! slots. An error is only reported once every op before it was decided on
//! real facts, so the failing op index is exactly the one the `json-patch`
//! crate names.
//!
//! Rounds of fetching (a `Need` answered) per patch:
//! * appends and by-reference removals only: 1 (length, floor, references);
//! * positional ops: 1, or 2 when some index reaches at or past the stored
//!   end (the endless-array guess then pointed at the wrong element);
//! * each by-reference removal that is followed by a positional op, and each
//!   `move`/`copy` whose target is `/member` itself, can add one round, as
//!   what follows them depends on facts that only the previous round brought.
//!
//! So the bound is `2 + B`, `B` being the number of such blocking ops (the
//! differential test asserts it). A caller that keeps length and floor in the
//! Group head can fill them in before the first call: value-only patches are
//! then planned without any fetch, positional patches without blocking ops
//! in exactly one round. Whole-array ops (`/member` itself as path or from)
//! ask for all slots, and replacing the array removes every stored slot one
//! event each: that cost is the op's, not the planner's.
//!
//! # Order keys
//!
//! See [`order_key`]: a key is a variable-width integer (one head letter
//! giving the width, then base-62 digits) followed by an optional base-62
//! fraction. Appending increments the integer, so a million appends keep keys
//! at 5 bytes (prepending likewise). Inserting between neighbours steps one
//! digit next to a neighbour or bisects the fraction: a thousand inserts at
//! one spot, in either direction, end at 35 bytes; 10,000 random inserts at
//! 13 bytes.
//!
//! # Extension: remove by reference
//!
//! With `remove_by_reference` on, `{"op": "remove", "path": "/member/-",
//! "value": {"entity": {"reference": R}}}` removes every element whose
//! `entity.reference` is R, and fails if there is none. RFC 6902 has no such
//! op (without the switch it fails as `json-patch` fails: `-` is never a
//! removable index). It needs only the by-reference lookup, so its cost does
//! not depend on the group's size.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchErrorKind, PatchOperation, RemoveOperation, ReplaceOperation};
use serde_json::{Map, Value};
use thiserror::Error;

/// One stored element of the member array.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    /// Opaque and stable for the slot's life.
    pub id: String,
    /// The array is the slots sorted bytewise by this key.
    pub key: String,
    /// The member JSON as the client sent it.
    pub element: Value,
}

/// A slot found by its `entity.reference`.
#[derive(Debug, Clone, PartialEq)]
pub struct RefSlot {
    pub slot: Slot,
    /// Original position, when it was asked for ([`Need::ref_positions`]).
    pub position: Option<usize>,
}

/// What the caller has fetched so far; fill it in from each [`Need`].
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// Number of stored slots.
    pub len: Option<usize>,
    /// The document has no `member` key at all (as after `remove /member`),
    /// as opposed to an empty array. Only meaningful with `len == Some(0)`.
    pub absent: bool,
    /// The append floor; `""` when no key was ever assigned.
    pub floor: Option<String>,
    /// Slots by original position. Positions at or past the end have no slot
    /// and are simply left out.
    pub at: BTreeMap<usize, Slot>,
    /// Slots by `entity.reference`, in key order. A reference that was asked
    /// for and matches nothing must be recorded with an empty list.
    pub by_ref: HashMap<String, Vec<RefSlot>>,
    /// Every slot in key order; answers every other question too.
    pub all: Option<Vec<Slot>>,
}

/// Facts [`plan`] needs before it can decide; every field is something the
/// caller does not have yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Need {
    /// [`Known::len`] and [`Known::absent`].
    pub len: bool,
    /// [`Known::floor`].
    pub floor: bool,
    /// Slots at these original positions (some may be past the end).
    pub positions: BTreeSet<usize>,
    /// Slots with these references, positions not needed.
    pub refs: BTreeSet<String>,
    /// Slots with these references, with their original positions.
    pub ref_positions: BTreeSet<String>,
    /// Every slot (whole-array ops only).
    pub all: bool,
}

impl Need {
    pub fn is_empty(&self) -> bool {
        !self.len
            && !self.floor
            && !self.all
            && self.positions.is_empty()
            && self.refs.is_empty()
            && self.ref_positions.is_empty()
    }

    fn merge(&mut self, other: Need) {
        self.len |= other.len;
        self.floor |= other.floor;
        self.all |= other.all;
        self.positions.extend(other.positions);
        self.ref_positions.extend(other.ref_positions);
        self.refs.extend(other.refs);
        let with_positions = &self.ref_positions;
        self.refs.retain(|r| !with_positions.contains(r));
    }
}

/// The answer of one [`plan`] call.
#[derive(Debug, Clone, PartialEq)]
pub enum Planned {
    Done(Plan),
    Need(Need),
}

/// What to store for a patch that applies.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// At most one event per slot; applying them in any order gives the
    /// same slot set, the order is the order the patch first touched them.
    pub events: Vec<SlotEvent>,
    /// Array length after the patch.
    pub len: usize,
    /// False when the patch leaves the document without a `member` key.
    pub present: bool,
    /// The new append floor, when the patch assigned keys above the old one.
    pub floor: Option<String>,
}

impl Plan {
    /// Change of the member count.
    pub fn member_delta(&self) -> i64 {
        self.events.iter().map(|e| e.delta(|_| true)).sum()
    }

    /// Change of the count of members whose element lacks `"inactive": true`.
    pub fn active_delta(&self) -> i64 {
        self.events.iter().map(|e| e.delta(is_active)).sum()
    }
}

/// A change to one slot.
#[derive(Debug, Clone, PartialEq)]
pub enum SlotEvent {
    /// A new slot (`before` is `None`), or a changed element or key.
    Put {
        id: String,
        key: String,
        before: Option<Value>,
        after: Value,
    },
    Remove {
        id: String,
        key: String,
        before: Value,
    },
}

impl SlotEvent {
    fn delta(&self, counts: impl Fn(&Value) -> bool) -> i64 {
        let (before, after) = match self {
            SlotEvent::Put { before, after, .. } => (before.as_ref(), Some(after)),
            SlotEvent::Remove { before, .. } => (Some(before), None),
        };
        i64::from(after.is_some_and(&counts)) - i64::from(before.is_some_and(&counts))
    }
}

/// Whether a member counts as active: FHIR's `inactive` defaults to false.
pub fn is_active(element: &Value) -> bool {
    element.get("inactive") != Some(&Value::Bool(true))
}

/// The element's `entity.reference`, when it is a string.
pub fn entity_reference(element: &Value) -> Option<&str> {
    element.get("entity")?.get("reference")?.as_str()
}

/// What the store indexes an element by: its `entity.reference`, or for
/// a member named by identifier only (no `reference` key)
/// `identifier:{system}|{value}`; `""` when it has neither, or an
/// identifier without system or value (such members are kept, just not
/// findable). The one rule for the store and the ATR operations alike.
pub fn match_key(element: &Value) -> String {
    element.get("entity").map(reference_key).unwrap_or_default()
}

/// [`match_key`]'s rule on any FHIR Reference (a member's `entity`, an
/// extension's `valueReference`).
pub fn reference_key(reference: &Value) -> String {
    if let Some(literal) = reference.get("reference") {
        return literal.as_str().unwrap_or_default().to_owned();
    }
    let identifier = reference.get("identifier");
    let part = |name: &str| identifier.and_then(|i| i.get(name)).and_then(Value::as_str);
    match (part("system"), part("value")) {
        (Some(system), Some(value)) => format!("identifier:{system}|{value}"),
        _ => String::new(),
    }
}

/// Which pointer of an op failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Path,
    From,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Path => "path",
            Side::From => "from",
        })
    }
}

/// Why a patch does not apply. `op` is the index of the failing op in the
/// slice given to [`plan`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PatchError {
    #[error("operation {op}: not a JSON Patch operation: {reason}")]
    Malformed { op: usize, reason: String },
    #[error("operation {op}: {side} '{pointer}' is not /member or below")]
    NotMember {
        op: usize,
        side: Side,
        pointer: String,
    },
    #[error("operation {op}: {side} '{pointer}' not found")]
    NotFound {
        op: usize,
        side: Side,
        pointer: String,
    },
    #[error("operation {op}: {side} '{pointer}': index out of bounds (member has {len} elements)")]
    OutOfBounds {
        op: usize,
        side: Side,
        pointer: String,
        len: usize,
    },
    #[error("operation {op}: {side} '{pointer}': invalid array index")]
    InvalidIndex {
        op: usize,
        side: Side,
        pointer: String,
    },
    #[error("operation {op}: test failed at '{pointer}'")]
    TestFailed { op: usize, pointer: String },
    #[error("operation {op}: cannot move '{from}' into its own child '{path}'")]
    MoveIntoChild {
        op: usize,
        from: String,
        path: String,
    },
    #[error("operation {op}: leaves member as {found}, it must be an array")]
    NotAnArray { op: usize, found: &'static str },
    #[error("operation {op}: remove by reference needs a value with a string entity.reference")]
    ReferenceMissing { op: usize },
    #[error("operation {op}: no member has entity.reference '{reference}'")]
    NoSuchReference { op: usize, reference: String },
    #[error("the store's answers contradict each other: {0}")]
    InconsistentFacts(String),
    #[error("order key: {0}")]
    OrderKey(#[from] order_key::KeyError),
}

impl PatchError {
    /// The failing op, when the error is about one.
    pub fn op_index(&self) -> Option<usize> {
        match self {
            PatchError::Malformed { op, .. }
            | PatchError::NotMember { op, .. }
            | PatchError::NotFound { op, .. }
            | PatchError::OutOfBounds { op, .. }
            | PatchError::InvalidIndex { op, .. }
            | PatchError::TestFailed { op, .. }
            | PatchError::MoveIntoChild { op, .. }
            | PatchError::NotAnArray { op, .. }
            | PatchError::ReferenceMissing { op }
            | PatchError::NoSuchReference { op, .. } => Some(*op),
            PatchError::InconsistentFacts(_) | PatchError::OrderKey(_) => None,
        }
    }
}

/// Plans `ops` (the member ops of one patch, in order; each path, and each
/// `from`, is `/member` or below) against `known`. `ids` makes fresh slot
/// ids and is only called for the plan that is returned as done.
/// `remove_by_reference` switches the extension described in the module doc.
pub fn plan(
    ops: &[Value],
    known: &Known,
    ids: &mut dyn FnMut() -> String,
    remove_by_reference: bool,
) -> Result<Planned, PatchError> {
    let ops = parse_ops(ops, remove_by_reference)?;
    let facts = Facts::new(known);
    let prefetch = prefetch(&ops, &facts);
    let mut sim = Sim::new(facts);
    let outcome = sim.run(&ops);
    match outcome {
        Ok(()) if sim.required.is_empty() => sim.finish(ids).map(Planned::Done),
        Err(Stop::Fail(e)) if sim.required.is_empty() => Err(e),
        _ => {
            let mut need = sim.required;
            need.merge(prefetch);
            if need.is_empty() {
                // A blocked replay always names what blocked it; if not,
                // looping again would never end.
                return Err(PatchError::InconsistentFacts(
                    "planning stalled without naming a missing fact".into(),
                ));
            }
            Ok(Planned::Need(need))
        }
    }
}

/// Order keys: short ASCII strings whose bytewise order is the array order.
///
/// A key is `head int frac`. `head` is a letter giving the width of `int`:
/// `a`..`z` for non-negative integers of 1..26 digits, `Z`..`A` for negative
/// ones of 1..26 digits (more digits, smaller), so every key with a smaller
/// integer sorts first, bytewise. `int` and `frac` are base-62 digits
/// `0-9A-Za-z` (ASCII order is digit order); `frac` never ends in `0`, or two
/// keys could be equal in value with no key between them.
///
/// * [`after`] increments the integer and drops the fraction: appends grow
///   the key by one byte each time the digit count rolls over (62, 3 906,
///   242 234, ... appends), so a million appends stay at 5 bytes.
/// * [`before`] decrements, the same way downwards.
/// * [`between`] uses the next integer when there is room, else steps one
///   digit up from the lower neighbour's fraction or down from the upper
///   one's, else bisects the fraction: runs of inserts at one spot cost a
///   byte per ~60 inserts, and bisection at most about a bit per insert.
pub mod order_key {
    use thiserror::Error;

    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    const TOP: u8 = 61;
    /// The base of fraction bisection: one past the largest digit.
    const CEILING: u8 = 62;

    /// The key of the first element of an array whose floor is `""`.
    pub const FIRST: &str = "a0";

    #[derive(Debug, Clone, PartialEq, Eq, Error)]
    pub enum KeyError {
        #[error("malformed order key '{0}'")]
        Malformed(String),
        #[error("order keys '{0}' and '{1}' are not strictly ascending")]
        NotAscending(String, String),
        #[error("order key space exhausted next to '{0}'")]
        Exhausted(String),
    }

    struct Key {
        head: u8,
        int: Vec<u8>,
        frac: Vec<u8>,
    }

    fn digit(byte: u8) -> Option<u8> {
        match byte {
            b'0'..=b'9' => Some(byte - b'0'),
            b'A'..=b'Z' => Some(byte - b'A' + 10),
            b'a'..=b'z' => Some(byte - b'a' + 36),
            _ => None,
        }
    }

    fn width(head: u8) -> Option<usize> {
        match head {
            b'a'..=b'z' => Some(usize::from(head - b'a') + 1),
            b'A'..=b'Z' => Some(usize::from(b'Z' - head) + 1),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<Key, KeyError> {
        let bad = || KeyError::Malformed(text.to_owned());
        let (&head, rest) = text.as_bytes().split_first().ok_or_else(bad)?;
        let width = width(head).ok_or_else(bad)?;
        let digits = rest
            .iter()
            .map(|&b| digit(b))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(bad)?;
        if digits.len() < width {
            return Err(bad());
        }
        let (int, frac) = digits.split_at(width);
        if frac.last() == Some(&0) {
            return Err(bad());
        }
        Ok(Key {
            head,
            int: int.to_vec(),
            frac: frac.to_vec(),
        })
    }

    fn render(head: u8, int: &[u8], frac: &[u8]) -> String {
        let mut out = String::with_capacity(1 + int.len() + frac.len());
        out.push(char::from(head));
        for &d in int.iter().chain(frac) {
            out.push(ALPHABET.get(usize::from(d)).map_or('0', |&b| char::from(b)));
        }
        out
    }

    fn increment(head: u8, int: &[u8]) -> Option<(u8, Vec<u8>)> {
        let mut digits = int.to_vec();
        if let Some(i) = digits.iter().rposition(|&d| d < TOP) {
            digits[i] += 1;
            digits[i + 1..].fill(0);
            return Some((head, digits));
        }
        match head {
            b'a'..=b'y' => Some((head + 1, vec![0; digits.len() + 1])),
            b'Z' => Some((b'a', vec![0])),
            b'A'..=b'Y' => Some((head + 1, vec![0; digits.len().saturating_sub(1)])),
            _ => None,
        }
    }

    fn decrement(head: u8, int: &[u8]) -> Option<(u8, Vec<u8>)> {
        let mut digits = int.to_vec();
        if let Some(i) = digits.iter().rposition(|&d| d > 0) {
            digits[i] -= 1;
            digits[i + 1..].fill(TOP);
            return Some((head, digits));
        }
        match head {
            b'B'..=b'Z' => Some((head - 1, vec![TOP; digits.len() + 1])),
            b'a' => Some((b'Z', vec![TOP])),
            b'b'..=b'z' => Some((head - 1, vec![TOP; digits.len().saturating_sub(1)])),
            _ => None,
        }
    }

    /// A fraction strictly between `lo` and `hi` (`None`: 1.0), given lo < hi.
    fn bisect(lo: &[u8], hi: Option<&[u8]>) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut hi = hi;
        let mut i = 0;
        loop {
            let a = lo.get(i).copied().unwrap_or(0);
            let b = match hi {
                Some(h) => *h.get(i)?,
                None => CEILING,
            };
            if a == b {
                out.push(a);
            } else if b > a + 1 {
                out.push((a + b) / 2);
                return Some(out);
            } else if b == a + 1 {
                // No digit fits here: keep lo's digit and go above lo's tail.
                out.push(a);
                hi = None;
            } else {
                return None;
            }
            i += 1;
        }
    }

    /// A fraction strictly between `lo` and `hi` (`None`: 1.0). Stepping
    /// next to a neighbour before bisecting serves runs of inserts at one
    /// spot: each new element lands right after the previous one (one step
    /// up from `lo`) or right before it (one step down from `hi`), so such a
    /// run costs a digit per ~60 inserts instead of a bit per insert.
    fn between_fractions(lo: &[u8], hi: Option<&[u8]>) -> Option<Vec<u8>> {
        if let Some((&last, head)) = lo.split_last() {
            if last < TOP {
                let mut up = head.to_vec();
                up.push(last + 1);
                if hi.is_none_or(|h| up.as_slice() < h) {
                    return Some(up);
                }
            }
        }
        if let Some((&last, head)) = hi.and_then(<[u8]>::split_last) {
            // A last digit of 1 would step down to a trailing 0.
            if last >= 2 {
                let mut down = head.to_vec();
                down.push(last - 1);
                if down.as_slice() > lo {
                    return Some(down);
                }
            }
        }
        bisect(lo, hi)
    }

    /// A key above `floor` (`""`: no key assigned yet).
    pub fn after(floor: &str) -> Result<String, KeyError> {
        if floor.is_empty() {
            return Ok(FIRST.to_owned());
        }
        let key = parse(floor)?;
        let (head, int) =
            increment(key.head, &key.int).ok_or_else(|| KeyError::Exhausted(floor.to_owned()))?;
        Ok(render(head, &int, &[]))
    }

    /// A key below `hi`.
    pub fn before(hi: &str) -> Result<String, KeyError> {
        let key = parse(hi)?;
        if !key.frac.is_empty() {
            return Ok(render(key.head, &key.int, &[]));
        }
        let (head, int) =
            decrement(key.head, &key.int).ok_or_else(|| KeyError::Exhausted(hi.to_owned()))?;
        Ok(render(head, &int, &[]))
    }

    /// A key strictly between `lo` and `hi`.
    pub fn between(lo: &str, hi: &str) -> Result<String, KeyError> {
        let not_ascending = || KeyError::NotAscending(lo.to_owned(), hi.to_owned());
        if lo >= hi {
            return Err(not_ascending());
        }
        let (a, b) = (parse(lo)?, parse(hi)?);
        if a.head == b.head && a.int == b.int {
            let frac = between_fractions(&a.frac, Some(&b.frac)).ok_or_else(not_ascending)?;
            return Ok(render(a.head, &a.int, &frac));
        }
        if let Some((head, int)) = increment(a.head, &a.int) {
            let next = render(head, &int, &[]);
            if next.as_str() < hi {
                return Ok(next);
            }
        }
        let frac = between_fractions(&a.frac, None).ok_or_else(not_ascending)?;
        Ok(render(a.head, &a.int, &frac))
    }

    /// Whether `key` is a key this module could have made.
    pub fn is_valid(key: &str) -> bool {
        parse(key).is_ok()
    }
}

// ---------------------------------------------------------------------------
// Parsing the ops

/// Where a pointer lands relative to the member array. Tokens stay encoded:
/// both json-patch's index parser and serde_json's accept digits only, so an
/// escaped token is never an index, and `rest` is handed back to json-patch.
enum Target {
    Whole,
    Elem(String),
    Sub(String, PointerBuf),
}

struct MemberOp {
    index: usize,
    op: PatchOperation,
    path: Target,
    from: Option<Target>,
    by_reference: Option<String>,
}

impl MemberOp {
    fn path_pointer(&self) -> &str {
        self.op.path().as_str()
    }

    fn source_pointer(&self) -> &str {
        match &self.op {
            PatchOperation::Move(m) => m.from.as_str(),
            PatchOperation::Copy(c) => c.from.as_str(),
            _ => "",
        }
    }
}

fn parse_ops(ops: &[Value], remove_by_reference: bool) -> Result<Vec<MemberOp>, PatchError> {
    ops.iter()
        .enumerate()
        .map(|(index, raw)| {
            let op: PatchOperation =
                serde_json::from_value(raw.clone()).map_err(|e| PatchError::Malformed {
                    op: index,
                    reason: e.to_string(),
                })?;
            let path = target(index, Side::Path, op.path().as_str())?;
            let from = match &op {
                PatchOperation::Move(m) => Some(target(index, Side::From, m.from.as_str())?),
                PatchOperation::Copy(c) => Some(target(index, Side::From, c.from.as_str())?),
                _ => None,
            };
            let mut by_reference = None;
            if remove_by_reference && matches!(op, PatchOperation::Remove(_)) {
                if let (Target::Elem(tok), Some(value)) = (&path, raw.get("value")) {
                    if tok == "-" {
                        let reference = entity_reference(value)
                            .ok_or(PatchError::ReferenceMissing { op: index })?;
                        by_reference = Some(reference.to_owned());
                    }
                }
            }
            Ok(MemberOp {
                index,
                op,
                path,
                from,
                by_reference,
            })
        })
        .collect()
}

fn target(op: usize, side: Side, pointer: &str) -> Result<Target, PatchError> {
    let not_member = || PatchError::NotMember {
        op,
        side,
        pointer: pointer.to_owned(),
    };
    let rest = pointer.strip_prefix("/member").ok_or_else(not_member)?;
    if rest.is_empty() {
        return Ok(Target::Whole);
    }
    let rest = rest.strip_prefix('/').ok_or_else(not_member)?;
    Ok(match rest.find('/') {
        None => Target::Elem(rest.to_owned()),
        Some(cut) => {
            let (tok, sub) = rest.split_at(cut);
            let sub = PointerBuf::parse(sub).map_err(|e| PatchError::Malformed {
                op,
                reason: e.to_string(),
            })?;
            Target::Sub(tok.to_owned(), sub)
        }
    })
}

enum Index {
    Next,
    Num(usize),
}

/// An array index as json-patch reads it for `add` and `remove` (jsonptr).
fn patch_index(tok: &str) -> Option<Index> {
    if tok == "-" {
        return Some(Index::Next);
    }
    lookup_index(tok).map(Index::Num)
}

/// An array index as serde_json's `pointer` reads it (everything but
/// `add`/`remove` of an element): digits, no leading zero, no `-`.
fn lookup_index(tok: &str) -> Option<usize> {
    if tok.is_empty() || !tok.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if tok.len() > 1 && tok.starts_with('0') {
        return None;
    }
    tok.parse().ok()
}

/// Facts that can be asked for up front, before the replay reaches them.
fn prefetch(ops: &[MemberOp], facts: &Facts) -> Need {
    let mut need = Need::default();
    let whole = |t: &Target| matches!(t, Target::Whole);
    if facts.len().is_none() {
        need.len = true;
    }
    if facts.known.floor.is_none()
        && ops.iter().any(|m| {
            matches!(
                m.op,
                PatchOperation::Add(_) | PatchOperation::Move(_) | PatchOperation::Copy(_)
            ) || (matches!(m.op, PatchOperation::Replace(_)) && whole(&m.path))
        })
    {
        need.floor = true;
    }
    let touches_whole = ops
        .iter()
        .any(|m| whole(&m.path) || m.from.as_ref().is_some_and(whole));
    if touches_whole && !facts.all_known() && !facts.known.absent {
        need.all = true;
    }
    let positional = |m: &MemberOp| {
        let indexed = |t: &Target| match t {
            Target::Whole => false,
            Target::Elem(tok) => !(tok == "-" && matches!(m.op, PatchOperation::Add(_))),
            Target::Sub(..) => true,
        };
        m.by_reference.is_none() && (indexed(&m.path) || m.from.as_ref().is_some_and(indexed))
    };
    let mut seen_by_reference = false;
    let mut want_positions = false;
    for m in ops {
        if m.by_reference.is_some() {
            seen_by_reference = true;
        } else if seen_by_reference && positional(m) {
            want_positions = true;
        }
    }
    for reference in ops.iter().filter_map(|m| m.by_reference.as_ref()) {
        if !facts.refs_known(reference, want_positions) {
            if want_positions {
                need.ref_positions.insert(reference.clone());
            } else {
                need.refs.insert(reference.clone());
            }
        }
    }
    need
}

// ---------------------------------------------------------------------------
// Facts, normalised: `all` answers everything, by-reference answers with
// positions also answer those positions.

struct Facts<'k> {
    known: &'k Known,
    by_position: HashMap<usize, &'k Slot>,
    all_by_ref: Option<HashMap<&'k str, Vec<(&'k Slot, usize)>>>,
}

impl<'k> Facts<'k> {
    fn new(known: &'k Known) -> Self {
        let mut by_position = HashMap::new();
        for list in known.by_ref.values() {
            for found in list {
                if let Some(p) = found.position {
                    by_position.insert(p, &found.slot);
                }
            }
        }
        let all_by_ref = known.all.as_ref().map(|all| {
            let mut index: HashMap<&str, Vec<(&Slot, usize)>> = HashMap::new();
            for (p, slot) in all.iter().enumerate() {
                if let Some(r) = entity_reference(&slot.element) {
                    index.entry(r).or_default().push((slot, p));
                }
            }
            index
        });
        Facts {
            known,
            by_position,
            all_by_ref,
        }
    }

    fn len(&self) -> Option<usize> {
        match &self.known.all {
            Some(all) => Some(all.len()),
            None => self.known.len,
        }
    }

    fn all_known(&self) -> bool {
        self.known.all.is_some() || self.len() == Some(0)
    }

    fn slot_at(&self, p: usize) -> Option<&'k Slot> {
        if let Some(all) = &self.known.all {
            return all.get(p);
        }
        self.known
            .at
            .get(&p)
            .or_else(|| self.by_position.get(&p).copied())
    }

    fn refs_known(&self, reference: &str, with_positions: bool) -> bool {
        if self.all_known() {
            return true;
        }
        self.known.by_ref.get(reference).is_some_and(|list| {
            !with_positions || list.iter().all(|found| found.position.is_some())
        })
    }

    fn refs(&self, reference: &str) -> Option<Vec<(&'k Slot, Option<usize>)>> {
        if let Some(index) = &self.all_by_ref {
            return Some(
                index
                    .get(reference)
                    .map(|list| list.iter().map(|&(s, p)| (s, Some(p))).collect())
                    .unwrap_or_default(),
            );
        }
        if self.len() == Some(0) {
            return Some(Vec::new());
        }
        self.known
            .by_ref
            .get(reference)
            .map(|list| list.iter().map(|f| (&f.slot, f.position)).collect())
    }
}

// ---------------------------------------------------------------------------
// The replay

/// The array as a list of pieces: runs of untouched stored slots, by original
/// position (`end: None` while the length is unknown: the run is endless),
/// and items: elements this patch touched or created.
enum Piece {
    Run { start: usize, end: Option<usize> },
    Item(Box<Item>),
}

struct Item {
    /// When the patch first touched it: the order of the plan's events.
    seq: u64,
    origin: Origin,
    /// `None` while unknown (a fact is missing, the round will not be final).
    key: Option<String>,
    value: Option<Value>,
    dirty: bool,
}

enum Origin {
    Stored(Option<Slot>),
    New,
}

/// A value taken out of the array: a whole element keeps its identity, so a
/// move is a change of key, not a remove and a new slot.
enum Payload {
    Item(Item),
    Value(Option<Value>),
}

enum Shape {
    Array,
    Absent,
    Other(Value),
    /// Set from a value not fetched yet; nothing after it can be decided.
    Unknown,
}

enum Stop {
    /// Cannot go on before the facts in `Sim::required` arrive.
    Blocked,
    /// This op fails, provided every op before it succeeded for real.
    Fail(PatchError),
}

impl From<order_key::KeyError> for Stop {
    fn from(e: order_key::KeyError) -> Self {
        Stop::Fail(PatchError::OrderKey(e))
    }
}

type Step<T> = Result<T, Stop>;

enum Loc {
    At(usize, usize),
    Past(usize),
}

/// A neighbour's key when choosing a key for an insert.
enum Bound {
    Edge,
    Key(String),
    Unknown,
}

#[derive(Clone, Copy)]
struct Ctx<'p> {
    op: usize,
    side: Side,
    pointer: &'p str,
}

impl Ctx<'_> {
    fn not_found(&self) -> Stop {
        Stop::Fail(PatchError::NotFound {
            op: self.op,
            side: self.side,
            pointer: self.pointer.to_owned(),
        })
    }

    fn out_of_bounds(&self, len: usize) -> Stop {
        Stop::Fail(PatchError::OutOfBounds {
            op: self.op,
            side: self.side,
            pointer: self.pointer.to_owned(),
            len,
        })
    }

    fn bad_index(&self) -> Stop {
        Stop::Fail(PatchError::InvalidIndex {
            op: self.op,
            side: self.side,
            pointer: self.pointer.to_owned(),
        })
    }

    fn test_failed(&self) -> Stop {
        Stop::Fail(PatchError::TestFailed {
            op: self.op,
            pointer: self.pointer.to_owned(),
        })
    }
}

struct Sim<'k> {
    facts: Facts<'k>,
    required: Need,
    shape: Shape,
    pieces: Vec<Piece>,
    /// Running floor: above every key assigned so far.
    floor: Option<String>,
    floor_moved: bool,
    /// Stored slots this patch removed, with the seq of their event.
    removed: Vec<(u64, Slot)>,
    /// Ids of stored slots no longer inside a run.
    taken: HashSet<String>,
    /// References whose removed slots are still counted inside the runs
    /// because their positions are unknown; positions cannot be mapped then.
    unplaced: BTreeSet<String>,
    unplaced_count: usize,
    seq: u64,
    /// The op that made `member` something other than an array.
    shape_op: usize,
}

impl<'k> Sim<'k> {
    fn new(facts: Facts<'k>) -> Self {
        let mut required = Need::default();
        let (shape, pieces) = match facts.len() {
            None => {
                required.len = true;
                (
                    Shape::Array,
                    vec![Piece::Run {
                        start: 0,
                        end: None,
                    }],
                )
            }
            Some(_) if facts.known.absent => (Shape::Absent, Vec::new()),
            Some(0) => (Shape::Array, Vec::new()),
            Some(len) => (
                Shape::Array,
                vec![Piece::Run {
                    start: 0,
                    end: Some(len),
                }],
            ),
        };
        let floor = facts.known.floor.clone();
        Sim {
            facts,
            required,
            shape,
            pieces,
            floor,
            floor_moved: false,
            removed: Vec::new(),
            taken: HashSet::new(),
            unplaced: BTreeSet::new(),
            unplaced_count: 0,
            seq: 0,
            shape_op: 0,
        }
    }

    fn run(&mut self, ops: &[MemberOp]) -> Step<()> {
        for m in ops {
            self.step(m)?;
        }
        match &self.shape {
            Shape::Other(v) => Err(Stop::Fail(PatchError::NotAnArray {
                op: self.shape_op,
                found: kind_of(v),
            })),
            Shape::Unknown => Err(Stop::Blocked),
            Shape::Array | Shape::Absent => Ok(()),
        }
    }

    fn step(&mut self, m: &MemberOp) -> Step<()> {
        if matches!(self.shape, Shape::Unknown) {
            return Err(Stop::Blocked);
        }
        if let Some(reference) = &m.by_reference {
            return self.remove_by_reference(m.index, reference);
        }
        if !matches!(self.shape, Shape::Array) {
            return self.delegate(m);
        }
        let at = Ctx {
            op: m.index,
            side: Side::Path,
            pointer: m.path_pointer(),
        };
        let from_ctx = Ctx {
            op: m.index,
            side: Side::From,
            pointer: m.source_pointer(),
        };
        match (&m.op, &m.from) {
            (PatchOperation::Add(add), _) => {
                self.add(at, &m.path, Payload::Value(Some(add.value.clone())))
            }
            (PatchOperation::Remove(_), _) => {
                let taken = self.remove(at, &m.path)?;
                self.discard(taken);
                Ok(())
            }
            (PatchOperation::Replace(replace), _) => self.replace(at, &m.path, &replace.value),
            (PatchOperation::Test(test), _) => self.test(at, &m.path, &test.value),
            (PatchOperation::Move(mv), Some(from)) => {
                // json-patch checks this before looking at the document.
                if mv.path.starts_with(&mv.from) && mv.path.len() != mv.from.len() {
                    return Err(Stop::Fail(PatchError::MoveIntoChild {
                        op: m.index,
                        from: mv.from.to_string(),
                        path: mv.path.to_string(),
                    }));
                }
                let taken = self.remove(from_ctx, from)?;
                self.add(at, &m.path, taken)
            }
            (PatchOperation::Copy(_), Some(from)) => {
                let value = self.get(from_ctx, from)?;
                self.add(at, &m.path, Payload::Value(value))
            }
            (PatchOperation::Move(_) | PatchOperation::Copy(_), None) => {
                Err(Stop::Fail(PatchError::Malformed {
                    op: m.index,
                    reason: "move or copy without from".into(),
                }))
            }
        }
    }

    /// Without an array there are no stored slots: the document is tiny and
    /// json-patch itself applies the op.
    fn delegate(&mut self, m: &MemberOp) -> Step<()> {
        let mut doc = Map::new();
        if let Shape::Other(v) = &self.shape {
            doc.insert("member".to_owned(), v.clone());
        }
        let mut doc = Value::Object(doc);
        json_patch::patch(&mut doc, std::slice::from_ref(&m.op))
            .map_err(|e| Stop::Fail(crate_error(m, &e.kind)))?;
        match doc.as_object_mut().and_then(|o| o.remove("member")) {
            None => {
                self.shape = Shape::Absent;
                Ok(())
            }
            Some(member) => self.set_member(m.index, Some(member)),
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn cur_len(&self) -> Option<usize> {
        let mut n = 0usize;
        for piece in &self.pieces {
            match piece {
                Piece::Item(_) => n += 1,
                Piece::Run {
                    start,
                    end: Some(end),
                } => n += end.saturating_sub(*start),
                Piece::Run { end: None, .. } => return None,
            }
        }
        Some(n.saturating_sub(self.unplaced_count))
    }

    fn require_position(&mut self, p: usize) {
        self.required.positions.insert(p);
    }

    /// Finds the element at index `n` (or the end).
    fn locate(&mut self, n: usize) -> Step<Loc> {
        if !self.unplaced.is_empty() {
            let unplaced = self.unplaced.iter().cloned();
            self.required.ref_positions.extend(unplaced);
            return Err(Stop::Blocked);
        }
        let mut acc = 0usize;
        for (i, piece) in self.pieces.iter().enumerate() {
            match piece {
                Piece::Item(_) => {
                    if n == acc {
                        return Ok(Loc::At(i, 0));
                    }
                    acc += 1;
                }
                Piece::Run {
                    start,
                    end: Some(end),
                } => {
                    let size = end.saturating_sub(*start);
                    if n < acc + size {
                        return Ok(Loc::At(i, n - acc));
                    }
                    acc += size;
                }
                Piece::Run { end: None, .. } => return Ok(Loc::At(i, n - acc)),
            }
        }
        Ok(Loc::Past(acc))
    }

    /// Makes the element at index `n` an item and returns its piece index.
    fn lift(&mut self, at: Ctx, n: usize) -> Step<usize> {
        let (i, offset) = match self.locate(n)? {
            Loc::At(i, offset) => (i, offset),
            Loc::Past(len) => return Err(at.out_of_bounds(len)),
        };
        let (start, end) = match self.pieces.get(i) {
            Some(Piece::Item(_)) => return Ok(i),
            Some(Piece::Run { start, end }) => (*start, *end),
            None => return Err(internal("located a piece that is not there")),
        };
        let p = start + offset;
        let slot = self.facts.slot_at(p).cloned();
        match &slot {
            Some(s) => {
                self.taken.insert(s.id.clone());
            }
            None => self.require_position(p),
        }
        let item = Item {
            seq: self.next_seq(),
            key: slot.as_ref().map(|s| s.key.clone()),
            value: slot.as_ref().map(|s| s.element.clone()),
            origin: Origin::Stored(slot),
            dirty: false,
        };
        Ok(self.split_run(i, start, end, p, Some(Piece::Item(Box::new(item)))))
    }

    /// Replaces run `i` by its part before `p`, `middle`, and its part after
    /// `p`; returns the index of `middle` (or of the part after it).
    fn split_run(
        &mut self,
        i: usize,
        start: usize,
        end: Option<usize>,
        p: usize,
        middle: Option<Piece>,
    ) -> usize {
        let mut parts = Vec::with_capacity(3);
        if p > start {
            parts.push(Piece::Run {
                start,
                end: Some(p),
            });
        }
        let middle_index = i + parts.len();
        parts.extend(middle);
        if end.is_none_or(|e| p + 1 < e) {
            parts.push(Piece::Run { start: p + 1, end });
        }
        self.pieces.splice(i..=i, parts);
        middle_index
    }

    fn item_mut(&mut self, i: usize) -> Step<&mut Item> {
        match self.pieces.get_mut(i) {
            Some(Piece::Item(item)) => Ok(item.as_mut()),
            _ => Err(internal("expected a touched element")),
        }
    }

    /// The element at index `tok` as serde_json's pointer finds it.
    fn lookup(&mut self, at: Ctx, tok: &str) -> Step<usize> {
        if tok == "-" {
            return Err(at.not_found());
        }
        let n = lookup_index(tok).ok_or_else(|| at.bad_index())?;
        self.lift(at, n)
    }

    fn key_at(&mut self, n: usize) -> Step<Bound> {
        let Loc::At(i, offset) = self.locate(n)? else {
            return Ok(Bound::Edge);
        };
        let p = match self.pieces.get(i) {
            Some(Piece::Item(item)) => {
                return Ok(item.key.clone().map_or(Bound::Unknown, Bound::Key));
            }
            Some(Piece::Run { start, .. }) => start + offset,
            None => return Err(internal("located a piece that is not there")),
        };
        match self.facts.slot_at(p) {
            Some(slot) => Ok(Bound::Key(slot.key.clone())),
            None => {
                self.require_position(p);
                Ok(Bound::Unknown)
            }
        }
    }

    fn make_item(&mut self, payload: Payload) -> Item {
        match payload {
            Payload::Item(item) => item,
            Payload::Value(value) => Item {
                seq: self.next_seq(),
                origin: Origin::New,
                key: None,
                value,
                dirty: true,
            },
        }
    }

    /// Drops a taken value; a stored slot taken whole is gone.
    fn discard(&mut self, payload: Payload) {
        if let Payload::Item(Item {
            seq,
            origin: Origin::Stored(Some(slot)),
            ..
        }) = payload
        {
            self.removed.push((seq, slot));
        }
    }

    fn payload_value(&mut self, payload: Payload) -> Option<Value> {
        match payload {
            Payload::Value(v) => v,
            Payload::Item(item) => {
                let value = item.value.clone();
                self.discard(Payload::Item(item));
                value
            }
        }
    }

    fn append_key(&mut self) -> Step<Option<String>> {
        match &self.floor {
            None => {
                self.required.floor = true;
                Ok(None)
            }
            Some(floor) => {
                let key = order_key::after(floor)?;
                self.floor = Some(key.clone());
                self.floor_moved = true;
                Ok(Some(key))
            }
        }
    }

    fn append(&mut self, payload: Payload) -> Step<()> {
        let mut item = self.make_item(payload);
        // Never the old key, even when it would fit: that would need the
        // last element's key, a positional fact appends must not cost.
        item.key = self.append_key()?;
        self.pieces.push(Piece::Item(Box::new(item)));
        Ok(())
    }

    fn insert_before(&mut self, at: Ctx, n: usize, payload: Payload) -> Step<()> {
        let (i, offset) = match self.locate(n)? {
            Loc::At(i, offset) => (i, offset),
            Loc::Past(len) if len == n => return self.append(payload),
            Loc::Past(len) => return Err(at.out_of_bounds(len)),
        };
        let right = self.key_at(n)?;
        let left = if n == 0 {
            Bound::Edge
        } else {
            self.key_at(n - 1)?
        };
        let mut item = self.make_item(payload);
        let fits = item.key.as_deref().is_some_and(|k| {
            let above = match &left {
                Bound::Edge => true,
                Bound::Key(l) => l.as_str() < k,
                Bound::Unknown => false,
            };
            let below = match &right {
                Bound::Key(r) => k < r.as_str(),
                Bound::Edge | Bound::Unknown => false,
            };
            above && below
        });
        if !fits {
            item.key = match (&left, &right) {
                (Bound::Key(l), Bound::Key(r)) => Some(order_key::between(l, r)?),
                (Bound::Edge, Bound::Key(r)) => Some(order_key::before(r)?),
                _ => None,
            };
        }
        let piece = Piece::Item(Box::new(item));
        match self.pieces.get(i) {
            Some(Piece::Run { start, end }) if offset > 0 => {
                let (start, end) = (*start, *end);
                let p = start + offset;
                // The element at `p` stays: split before it, not around it.
                let mut parts = vec![Piece::Run {
                    start,
                    end: Some(p),
                }];
                parts.push(piece);
                parts.push(Piece::Run { start: p, end });
                self.pieces.splice(i..=i, parts);
            }
            _ => self.pieces.insert(i, piece),
        }
        Ok(())
    }

    fn add(&mut self, at: Ctx, target: &Target, payload: Payload) -> Step<()> {
        match target {
            Target::Whole => {
                let value = self.payload_value(payload);
                self.replace_member(at.op, value)
            }
            Target::Elem(tok) => {
                if !matches!(self.shape, Shape::Array) {
                    return Err(at.not_found());
                }
                match patch_index(tok).ok_or_else(|| at.bad_index())? {
                    Index::Next => self.append(payload),
                    Index::Num(n) => match self.cur_len() {
                        Some(len) if n > len => Err(at.out_of_bounds(len)),
                        Some(len) if n == len => self.append(payload),
                        _ => self.insert_before(at, n, payload),
                    },
                }
            }
            Target::Sub(tok, rest) => {
                let value = self.payload_value(payload);
                if !matches!(self.shape, Shape::Array) {
                    return Err(at.not_found());
                }
                let i = self.lookup(at, tok)?;
                let op = value.map(|value| {
                    PatchOperation::Add(AddOperation {
                        path: rest.clone(),
                        value,
                    })
                });
                edit(at, self.item_mut(i)?, op)
            }
        }
    }

    fn remove(&mut self, at: Ctx, target: &Target) -> Step<Payload> {
        match target {
            Target::Whole => {
                let value = self.materialize();
                self.take_all();
                self.shape = Shape::Absent;
                Ok(Payload::Value(value.map(Value::Array)))
            }
            Target::Elem(tok) => {
                let n = match patch_index(tok).ok_or_else(|| at.bad_index())? {
                    Index::Next => return Err(at.out_of_bounds(self.cur_len().unwrap_or(0))),
                    Index::Num(n) => n,
                };
                if let Some(len) = self.cur_len() {
                    if n >= len {
                        return Err(at.out_of_bounds(len));
                    }
                }
                let i = self.lift(at, n)?;
                match self.pieces.remove(i) {
                    Piece::Item(item) => Ok(Payload::Item(*item)),
                    Piece::Run { .. } => Err(internal("expected a touched element")),
                }
            }
            Target::Sub(tok, rest) => {
                let i = self.lookup(at, tok)?;
                let item = self.item_mut(i)?;
                let Some(element) = &item.value else {
                    return Ok(Payload::Value(None));
                };
                let taken = element.pointer(rest.as_str()).cloned();
                edit(
                    at,
                    item,
                    Some(PatchOperation::Remove(RemoveOperation {
                        path: rest.clone(),
                    })),
                )?;
                taken
                    .map(|v| Payload::Value(Some(v)))
                    .ok_or_else(|| at.not_found())
            }
        }
    }

    fn replace(&mut self, at: Ctx, target: &Target, value: &Value) -> Step<()> {
        match target {
            Target::Whole => self.replace_member(at.op, Some(value.clone())),
            Target::Elem(tok) => {
                let i = self.lookup(at, tok)?;
                let item = self.item_mut(i)?;
                item.value = Some(value.clone());
                item.dirty = true;
                Ok(())
            }
            Target::Sub(tok, rest) => {
                let i = self.lookup(at, tok)?;
                let op = PatchOperation::Replace(ReplaceOperation {
                    path: rest.clone(),
                    value: value.clone(),
                });
                edit(at, self.item_mut(i)?, Some(op))
            }
        }
    }

    fn test(&mut self, at: Ctx, target: &Target, expected: &Value) -> Step<()> {
        let found = match target {
            Target::Whole => self.materialize().map(Value::Array),
            Target::Elem(tok) => {
                let i = self.lookup(at, tok)?;
                self.item_mut(i)?.value.clone()
            }
            Target::Sub(tok, rest) => {
                let i = self.lookup(at, tok)?;
                match &self.item_mut(i)?.value {
                    None => None,
                    Some(element) => Some(
                        element
                            .pointer(rest.as_str())
                            .cloned()
                            .ok_or_else(|| at.not_found())?,
                    ),
                }
            }
        };
        match found {
            Some(value) if value != *expected => Err(at.test_failed()),
            _ => Ok(()),
        }
    }

    fn get(&mut self, at: Ctx, target: &Target) -> Step<Option<Value>> {
        match target {
            Target::Whole => Ok(self.materialize().map(Value::Array)),
            Target::Elem(tok) => {
                let i = self.lookup(at, tok)?;
                Ok(self.item_mut(i)?.value.clone())
            }
            Target::Sub(tok, rest) => {
                let i = self.lookup(at, tok)?;
                match &self.item_mut(i)?.value {
                    None => Ok(None),
                    Some(element) => element
                        .pointer(rest.as_str())
                        .cloned()
                        .map(Some)
                        .ok_or_else(|| at.not_found()),
                }
            }
        }
    }

    /// The current array, when every element is known.
    fn materialize(&mut self) -> Option<Vec<Value>> {
        if !self.unplaced.is_empty() {
            self.required.all = true;
            return None;
        }
        let mut out = Vec::new();
        let mut complete = true;
        for piece in &self.pieces {
            match piece {
                Piece::Item(item) => match &item.value {
                    Some(v) => out.push(v.clone()),
                    None => complete = false,
                },
                Piece::Run {
                    start,
                    end: Some(end),
                } => {
                    for p in *start..*end {
                        match self.facts.slot_at(p) {
                            Some(slot) => out.push(slot.element.clone()),
                            None => complete = false,
                        }
                    }
                }
                Piece::Run { end: None, .. } => complete = false,
            }
        }
        if !complete {
            self.required.all = true;
        }
        complete.then_some(out)
    }

    /// Removes every element; stored ones become remove events.
    fn take_all(&mut self) {
        for piece in std::mem::take(&mut self.pieces) {
            match piece {
                Piece::Item(item) => self.discard(Payload::Item(*item)),
                Piece::Run {
                    start,
                    end: Some(end),
                } => {
                    for p in start..end {
                        match self.facts.slot_at(p) {
                            Some(slot) if self.taken.insert(slot.id.clone()) => {
                                let seq = self.next_seq();
                                self.removed.push((seq, slot.clone()));
                            }
                            Some(_) => {}
                            None => self.required.all = true,
                        }
                    }
                }
                Piece::Run { end: None, .. } => self.required.all = true,
            }
        }
        self.unplaced.clear();
        self.unplaced_count = 0;
    }

    /// `add`/`replace` of `/member` itself (`None`: a value not known yet).
    fn replace_member(&mut self, op: usize, value: Option<Value>) -> Step<()> {
        if matches!(self.shape, Shape::Array) {
            self.take_all();
        }
        self.set_member(op, value)
    }

    fn set_member(&mut self, op: usize, value: Option<Value>) -> Step<()> {
        self.pieces.clear();
        match value {
            None => self.shape = Shape::Unknown,
            Some(Value::Array(elements)) => {
                self.shape = Shape::Array;
                for element in elements {
                    let item = Item {
                        seq: self.next_seq(),
                        origin: Origin::New,
                        key: self.append_key()?,
                        value: Some(element),
                        dirty: true,
                    };
                    self.pieces.push(Piece::Item(Box::new(item)));
                }
            }
            Some(other) => {
                self.shape = Shape::Other(other);
                self.shape_op = op;
            }
        }
        Ok(())
    }

    fn remove_by_reference(&mut self, op: usize, reference: &str) -> Step<()> {
        let no_match = || {
            Stop::Fail(PatchError::NoSuchReference {
                op,
                reference: reference.to_owned(),
            })
        };
        if !matches!(self.shape, Shape::Array) {
            return Err(no_match());
        }
        // Touched elements are judged by their current value: the patch may
        // have changed their reference.
        if self
            .pieces
            .iter()
            .any(|p| matches!(p, Piece::Item(item) if item.value.is_none()))
        {
            return Err(Stop::Blocked);
        }
        let Some(stored) = self.facts.refs(reference) else {
            self.required.refs.insert(reference.to_owned());
            return Err(Stop::Blocked);
        };
        let mut matched = 0usize;
        let pieces = std::mem::take(&mut self.pieces);
        for piece in pieces {
            match piece {
                Piece::Item(item)
                    if item.value.as_ref().and_then(entity_reference) == Some(reference) =>
                {
                    matched += 1;
                    self.discard(Payload::Item(*item));
                }
                other => self.pieces.push(other),
            }
        }
        let len = self.facts.len();
        for (slot, position) in stored {
            if self.taken.contains(&slot.id) {
                continue;
            }
            match position {
                Some(p) => {
                    if len.is_some_and(|len| p >= len) {
                        return Err(Stop::Fail(PatchError::InconsistentFacts(format!(
                            "slot {} at position {p} of {} slots",
                            slot.id,
                            len.unwrap_or(0)
                        ))));
                    }
                    let Some((i, start, end)) = self.run_with(p) else {
                        // Touched already: judged above by its current value.
                        continue;
                    };
                    self.split_run(i, start, end, p, None);
                }
                None => {
                    self.unplaced.insert(reference.to_owned());
                    self.unplaced_count += 1;
                }
            }
            self.taken.insert(slot.id.clone());
            let seq = self.next_seq();
            self.removed.push((seq, slot.clone()));
            matched += 1;
        }
        if matched == 0 {
            return Err(no_match());
        }
        Ok(())
    }

    fn run_with(&self, p: usize) -> Option<(usize, usize, Option<usize>)> {
        self.pieces
            .iter()
            .enumerate()
            .find_map(|(i, piece)| match piece {
                Piece::Run { start, end } if *start <= p && end.is_none_or(|e| p < e) => {
                    Some((i, *start, *end))
                }
                _ => None,
            })
    }

    fn finish(self, ids: &mut dyn FnMut() -> String) -> Result<Plan, PatchError> {
        let present = matches!(self.shape, Shape::Array);
        let len = if present {
            self.cur_len()
                .ok_or_else(|| PatchError::InconsistentFacts("length unknown".into()))?
        } else {
            0
        };
        let mut events: Vec<(u64, SlotEvent)> = self
            .removed
            .into_iter()
            .map(|(seq, slot)| {
                let event = SlotEvent::Remove {
                    id: slot.id,
                    key: slot.key,
                    before: slot.element,
                };
                (seq, event)
            })
            .collect();
        for piece in self.pieces {
            let Piece::Item(item) = piece else { continue };
            let item = *item;
            let (Some(key), Some(after)) = (item.key, item.value) else {
                return Err(PatchError::InconsistentFacts(
                    "an element's key or value stayed unknown".into(),
                ));
            };
            let event = match item.origin {
                Origin::New => SlotEvent::Put {
                    id: ids(),
                    key,
                    before: None,
                    after,
                },
                Origin::Stored(Some(slot)) => {
                    if !item.dirty && key == slot.key {
                        continue;
                    }
                    SlotEvent::Put {
                        id: slot.id,
                        key,
                        before: Some(slot.element),
                        after,
                    }
                }
                Origin::Stored(None) => {
                    return Err(PatchError::InconsistentFacts(
                        "a touched stored slot was never fetched".into(),
                    ))
                }
            };
            events.push((item.seq, event));
        }
        events.sort_by_key(|(seq, _)| *seq);
        Ok(Plan {
            events: events.into_iter().map(|(_, e)| e).collect(),
            len,
            present,
            floor: if self.floor_moved { self.floor } else { None },
        })
    }
}

/// Applies one sub-element op with json-patch itself, so RFC details inside
/// the element (object key order after a remove, `-` in nested arrays, error
/// cases) are exactly the legacy server's. `None`: the value is not known yet.
fn edit(at: Ctx, item: &mut Item, op: Option<PatchOperation>) -> Step<()> {
    item.dirty = true;
    let (Some(element), Some(op)) = (item.value.as_mut(), op) else {
        item.value = None;
        return Ok(());
    };
    json_patch::patch(element, std::slice::from_ref(&op)).map_err(|e| match e.kind {
        PatchErrorKind::TestFailed => at.test_failed(),
        _ => at.not_found(),
    })
}

fn crate_error(m: &MemberOp, kind: &PatchErrorKind) -> PatchError {
    let path = m.path_pointer().to_owned();
    match kind {
        PatchErrorKind::TestFailed => PatchError::TestFailed {
            op: m.index,
            pointer: path,
        },
        PatchErrorKind::InvalidFromPointer => PatchError::NotFound {
            op: m.index,
            side: Side::From,
            pointer: m.source_pointer().to_owned(),
        },
        PatchErrorKind::CannotMoveInsideItself => PatchError::MoveIntoChild {
            op: m.index,
            from: m.source_pointer().to_owned(),
            path,
        },
        _ => PatchError::NotFound {
            op: m.index,
            side: Side::Path,
            pointer: path,
        },
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn internal(what: &str) -> Stop {
    Stop::Fail(PatchError::InconsistentFacts(format!("internal: {what}")))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn member(reference: &str) -> Value {
        json!({"entity": {"reference": reference}})
    }

    /// A store that answers every need from the whole array.
    struct Store {
        slots: Vec<Slot>,
        floor: String,
        absent: bool,
        next_id: Cell<usize>,
    }

    #[derive(Debug, Default)]
    struct Stats {
        rounds: usize,
        positions: usize,
        all: bool,
        needs: Vec<Need>,
    }

    impl Store {
        fn new(elements: &[Value]) -> Store {
            let mut floor = String::new();
            let mut slots = Vec::new();
            for (i, element) in elements.iter().enumerate() {
                let key = order_key::after(&floor).unwrap();
                floor = key.clone();
                slots.push(Slot {
                    id: format!("s{i}"),
                    key,
                    element: element.clone(),
                });
            }
            Store {
                slots,
                floor,
                absent: false,
                next_id: Cell::new(0),
            }
        }

        fn of(references: &[&str]) -> Store {
            Store::new(&references.iter().map(|r| member(r)).collect::<Vec<_>>())
        }

        fn find(&self, reference: &str, with_positions: bool) -> Vec<RefSlot> {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| entity_reference(&s.element) == Some(reference))
                .map(|(p, s)| RefSlot {
                    slot: s.clone(),
                    position: with_positions.then_some(p),
                })
                .collect()
        }

        fn answer(&self, need: &Need, known: &mut Known) {
            if need.len {
                known.len = Some(self.slots.len());
                known.absent = self.absent;
            }
            if need.floor {
                known.floor = Some(self.floor.clone());
            }
            for &p in &need.positions {
                if let Some(slot) = self.slots.get(p) {
                    known.at.insert(p, slot.clone());
                }
            }
            for r in &need.refs {
                known.by_ref.insert(r.clone(), self.find(r, false));
            }
            for r in &need.ref_positions {
                known.by_ref.insert(r.clone(), self.find(r, true));
            }
            if need.all {
                known.all = Some(self.slots.clone());
            }
        }

        fn plan(&self, ops: &[Value], extension: bool) -> (Result<Plan, PatchError>, Stats) {
            let mut known = Known::default();
            let mut stats = Stats::default();
            let mut ids = || {
                self.next_id.set(self.next_id.get() + 1);
                format!("n{}", self.next_id.get())
            };
            loop {
                match plan(ops, &known, &mut ids, extension) {
                    Ok(Planned::Done(p)) => return (Ok(p), stats),
                    Err(e) => return (Err(e), stats),
                    Ok(Planned::Need(need)) => {
                        stats.rounds += 1;
                        assert!(stats.rounds <= 12, "no progress, still needs {need:?}");
                        assert!(!need.is_empty());
                        stats.positions += need.positions.len();
                        stats.all |= need.all;
                        stats.needs.push(need.clone());
                        self.answer(&need, &mut known);
                    }
                }
            }
        }

        /// Applies a plan as the real store would, checking its promises.
        fn apply(&mut self, plan: &Plan) {
            let members_before = self.slots.len() as i64;
            let active_before = self.slots.iter().filter(|s| is_active(&s.element)).count() as i64;
            let mut seen = HashSet::new();
            for event in &plan.events {
                match event {
                    SlotEvent::Put {
                        id,
                        key,
                        before,
                        after,
                    } => {
                        assert!(seen.insert(id.clone()), "two events for slot {id}");
                        match self.slots.iter_mut().find(|s| &s.id == id) {
                            Some(slot) => {
                                assert_eq!(Some(&slot.element), before.as_ref());
                                slot.key = key.clone();
                                slot.element = after.clone();
                            }
                            None => {
                                assert!(before.is_none(), "update of a slot that is not there");
                                self.slots.push(Slot {
                                    id: id.clone(),
                                    key: key.clone(),
                                    element: after.clone(),
                                });
                            }
                        }
                    }
                    SlotEvent::Remove { id, key, before } => {
                        assert!(seen.insert(id.clone()), "two events for slot {id}");
                        let i = self.slots.iter().position(|s| &s.id == id).unwrap();
                        assert_eq!(&self.slots[i].key, key);
                        assert_eq!(&self.slots[i].element, before);
                        self.slots.remove(i);
                    }
                }
            }
            self.slots.sort_by(|a, b| a.key.cmp(&b.key));
            for pair in self.slots.windows(2) {
                assert!(pair[0].key < pair[1].key, "keys not unique: {pair:?}");
            }
            if let Some(floor) = &plan.floor {
                assert!(*floor >= self.floor);
                self.floor = floor.clone();
            }
            for slot in &self.slots {
                assert!(slot.key.is_ascii() && order_key::is_valid(&slot.key));
                assert!(
                    slot.key <= self.floor,
                    "{} above floor {}",
                    slot.key,
                    self.floor
                );
            }
            assert_eq!(plan.len, self.slots.len());
            self.absent = !plan.present;
            let active_after = self.slots.iter().filter(|s| is_active(&s.element)).count() as i64;
            assert_eq!(
                plan.member_delta(),
                self.slots.len() as i64 - members_before
            );
            assert_eq!(plan.active_delta(), active_after - active_before);
        }

        fn elements(&self) -> Vec<Value> {
            self.slots.iter().map(|s| s.element.clone()).collect()
        }

        fn patch(&mut self, ops: &[Value], extension: bool) -> Result<Plan, PatchError> {
            let (result, _) = self.plan(ops, extension);
            if let Ok(p) = &result {
                self.apply(p);
            }
            result
        }
    }

    fn references(store: &Store) -> Vec<String> {
        store
            .slots
            .iter()
            .map(|s| entity_reference(&s.element).unwrap_or("?").to_owned())
            .collect()
    }

    #[test]
    fn appending_needs_only_the_length_and_the_floor() {
        let mut store = Store::of(&["Patient/1", "Patient/2"]);
        let ops = [json!({"op": "add", "path": "/member/-", "value": member("Patient/3")})];
        let (result, stats) = store.plan(&ops, false);
        assert_eq!(stats.rounds, 1);
        assert_eq!(stats.positions, 0);
        assert!(!stats.all);
        assert!(stats.needs[0].len && stats.needs[0].floor);
        store.apply(&result.unwrap());
        assert_eq!(references(&store), ["Patient/1", "Patient/2", "Patient/3"]);
    }

    #[test]
    fn appended_keys_rise_above_the_floor_even_after_removals() {
        let mut store = Store::of(&["Patient/1", "Patient/2"]);
        store.floor = "c000".into();
        let plan = store
            .patch(
                &[json!({"op": "add", "path": "/member/2", "value": member("Patient/3")})],
                false,
            )
            .unwrap();
        assert_eq!(plan.floor.as_deref(), Some("c001"));
        assert_eq!(store.slots[2].key, "c001");
    }

    #[test]
    fn an_insert_gets_a_key_between_its_neighbours() {
        let mut store = Store::of(&["Patient/1", "Patient/2", "Patient/3"]);
        let ops = [json!({"op": "add", "path": "/member/1", "value": member("Patient/9")})];
        let (result, stats) = store.plan(&ops, false);
        assert_eq!(
            stats.rounds, 1,
            "both neighbours asked for in the first round"
        );
        assert_eq!(stats.needs[0].positions, BTreeSet::from([0, 1]));
        let plan = result.unwrap();
        assert_eq!(plan.floor, None, "an insert does not move the floor");
        store.apply(&plan);
        assert_eq!(
            references(&store),
            ["Patient/1", "Patient/9", "Patient/2", "Patient/3"]
        );
    }

    #[test]
    fn an_insert_at_the_front_gets_a_key_below_the_first() {
        let mut store = Store::of(&["Patient/1"]);
        store
            .patch(
                &[json!({"op": "add", "path": "/member/0", "value": member("Patient/0")})],
                false,
            )
            .unwrap();
        assert_eq!(references(&store), ["Patient/0", "Patient/1"]);
    }

    #[test]
    fn removing_by_index_removes_that_slot_with_its_element() {
        let mut store = Store::of(&["Patient/1", "Patient/2", "Patient/3"]);
        let plan = store
            .patch(&[json!({"op": "remove", "path": "/member/1"})], false)
            .unwrap();
        assert_eq!(
            plan.events,
            [SlotEvent::Remove {
                id: "s1".into(),
                key: "a1".into(),
                before: member("Patient/2"),
            }]
        );
        assert_eq!(references(&store), ["Patient/1", "Patient/3"]);
    }

    #[test]
    fn replacing_keeps_the_slot_id_and_key() {
        let mut store = Store::of(&["Patient/1", "Patient/2"]);
        let plan = store
            .patch(
                &[json!({"op": "replace", "path": "/member/0", "value": member("Patient/7")})],
                false,
            )
            .unwrap();
        assert_eq!(
            plan.events,
            [SlotEvent::Put {
                id: "s0".into(),
                key: "a0".into(),
                before: Some(member("Patient/1")),
                after: member("Patient/7"),
            }]
        );
    }

    #[test]
    fn a_passing_test_changes_nothing() {
        let store = Store::of(&["Patient/1"]);
        let ops = [json!({"op": "test", "path": "/member/0", "value": member("Patient/1")})];
        let plan = store.plan(&ops, false).0.unwrap();
        assert!(plan.events.is_empty());
        assert_eq!(plan.len, 1);
    }

    #[test]
    fn a_failing_test_fails_the_whole_patch_and_plans_nothing() {
        let store = Store::of(&["Patient/1"]);
        let ops = [
            json!({"op": "add", "path": "/member/-", "value": member("Patient/2")}),
            json!({"op": "test", "path": "/member/0", "value": member("Patient/9")}),
        ];
        assert_eq!(
            store.plan(&ops, false).0,
            Err(PatchError::TestFailed {
                op: 1,
                pointer: "/member/0".into()
            })
        );
    }

    #[test]
    fn numbers_are_tested_as_json_values_not_as_text() {
        let store = Store::new(&[json!({"entity": {"reference": "Patient/1"}, "n": 1})]);
        let ops = [json!({"op": "test", "path": "/member/0/n", "value": 1.0})];
        assert!(matches!(
            store.plan(&ops, false).0,
            Err(PatchError::TestFailed { op: 0, .. })
        ));
    }

    #[test]
    fn moving_keeps_the_slot_id_and_changes_the_key() {
        let mut store = Store::of(&["Patient/1", "Patient/2", "Patient/3"]);
        let plan = store
            .patch(
                &[json!({"op": "move", "from": "/member/0", "path": "/member/2"})],
                false,
            )
            .unwrap();
        assert_eq!(plan.events.len(), 1);
        assert!(matches!(&plan.events[0], SlotEvent::Put { id, .. } if id == "s0"));
        assert_eq!(references(&store), ["Patient/2", "Patient/3", "Patient/1"]);
    }

    #[test]
    fn moving_to_the_same_index_writes_nothing() {
        let store = Store::of(&["Patient/1", "Patient/2", "Patient/3"]);
        let ops = [json!({"op": "move", "from": "/member/1", "path": "/member/1"})];
        assert!(store.plan(&ops, false).0.unwrap().events.is_empty());
    }

    #[test]
    fn copying_makes_a_new_slot_with_the_same_element() {
        let mut store = Store::of(&["Patient/1", "Patient/2"]);
        let plan = store
            .patch(
                &[json!({"op": "copy", "from": "/member/1", "path": "/member/0"})],
                false,
            )
            .unwrap();
        assert!(matches!(
            &plan.events[..],
            [SlotEvent::Put { before: None, .. }]
        ));
        assert_eq!(references(&store), ["Patient/2", "Patient/1", "Patient/2"]);
    }

    #[test]
    fn a_sub_element_edit_changes_only_that_element() {
        let mut store = Store::of(&["Patient/1", "Patient/2"]);
        store
            .patch(
                &[json!({"op": "add", "path": "/member/1/entity/display", "value": "Bob"})],
                false,
            )
            .unwrap();
        assert_eq!(
            store.elements(),
            [
                member("Patient/1"),
                json!({"entity": {"reference": "Patient/2", "display": "Bob"}})
            ]
        );
    }

    #[test]
    fn a_sub_element_op_on_a_missing_target_is_not_found() {
        let store = Store::of(&["Patient/1"]);
        for op in [
            json!({"op": "remove", "path": "/member/0/period"}),
            json!({"op": "replace", "path": "/member/0/period/start", "value": "2020"}),
            json!({"op": "test", "path": "/member/0/extension/0", "value": 1}),
            json!({"op": "add", "path": "/member/0/period/start", "value": "2020"}),
            json!({"op": "add", "path": "/member/3/period", "value": {}}),
        ] {
            let result = store.plan(std::slice::from_ref(&op), false).0;
            assert!(
                matches!(
                    result,
                    Err(PatchError::NotFound { op: 0, .. })
                        | Err(PatchError::OutOfBounds { op: 0, .. })
                ),
                "{op}: {result:?}"
            );
        }
    }

    #[test]
    fn an_index_past_the_end_is_out_of_bounds() {
        let store = Store::of(&["Patient/1", "Patient/2"]);
        for op in [
            json!({"op": "add", "path": "/member/3", "value": member("Patient/3")}),
            json!({"op": "remove", "path": "/member/2"}),
            json!({"op": "replace", "path": "/member/2", "value": member("Patient/3")}),
            json!({"op": "test", "path": "/member/5", "value": member("Patient/3")}),
        ] {
            let result = store.plan(std::slice::from_ref(&op), false).0;
            assert!(
                matches!(result, Err(PatchError::OutOfBounds { op: 0, len: 2, .. })),
                "{op}: {result:?}"
            );
        }
    }

    #[test]
    fn an_index_with_a_leading_zero_is_invalid() {
        let store = Store::of(&["Patient/1", "Patient/2"]);
        let result = store
            .plan(&[json!({"op": "remove", "path": "/member/01"})], false)
            .0;
        assert!(matches!(
            result,
            Err(PatchError::InvalidIndex { op: 0, .. })
        ));
    }

    #[test]
    fn removing_dash_fails_without_the_extension() {
        let store = Store::of(&["Patient/1"]);
        let ops = [json!({"op": "remove", "path": "/member/-", "value": member("Patient/1")})];
        assert!(matches!(
            store.plan(&ops, false).0,
            Err(PatchError::OutOfBounds { op: 0, .. })
        ));
    }

    #[test]
    fn the_extension_removes_every_slot_with_the_reference_and_asks_no_positions() {
        let mut store = Store::of(&["Patient/1", "Patient/2", "Patient/1", "Patient/3"]);
        let ops = [
            json!({"op": "add", "path": "/member/-", "value": member("Patient/1")}),
            json!({"op": "remove", "path": "/member/-", "value": member("Patient/1")}),
            json!({"op": "add", "path": "/member/-", "value": member("Patient/4")}),
        ];
        let (result, stats) = store.plan(&ops, true);
        assert_eq!((stats.rounds, stats.positions, stats.all), (1, 0, false));
        let plan = result.unwrap();
        assert_eq!(plan.member_delta(), -1);
        store.apply(&plan);
        assert_eq!(references(&store), ["Patient/2", "Patient/3", "Patient/4"]);
    }

    #[test]
    fn the_extension_followed_by_an_index_asks_for_positions_up_front() {
        let mut store = Store::of(&["Patient/1", "Patient/2", "Patient/1", "Patient/3"]);
        let ops = [
            json!({"op": "remove", "path": "/member/-", "value": member("Patient/1")}),
            json!({"op": "remove", "path": "/member/1"}),
        ];
        let (result, stats) = store.plan(&ops, true);
        assert_eq!(
            stats.needs[0].ref_positions,
            BTreeSet::from(["Patient/1".to_owned()])
        );
        assert_eq!(stats.rounds, 2);
        store.apply(&result.unwrap());
        assert_eq!(references(&store), ["Patient/2"]);
    }

    #[test]
    fn the_extension_sees_references_changed_earlier_in_the_patch() {
        let mut store = Store::of(&["Patient/1", "Patient/2"]);
        let ops = [
            json!({"op": "replace", "path": "/member/1/entity/reference", "value": "Patient/1"}),
            json!({"op": "replace", "path": "/member/0/entity/reference", "value": "Patient/5"}),
            json!({"op": "remove", "path": "/member/-", "value": member("Patient/1")}),
        ];
        store.patch(&ops, true).unwrap();
        assert_eq!(references(&store), ["Patient/5"]);
    }

    #[test]
    fn the_extension_fails_when_no_member_has_the_reference() {
        let store = Store::of(&["Patient/1"]);
        let ops = [json!({"op": "remove", "path": "/member/-", "value": member("Patient/2")})];
        assert_eq!(
            store.plan(&ops, true).0,
            Err(PatchError::NoSuchReference {
                op: 0,
                reference: "Patient/2".into()
            })
        );
    }

    #[test]
    fn the_extension_needs_a_value_with_a_reference() {
        let store = Store::of(&["Patient/1"]);
        let ops = [json!({"op": "remove", "path": "/member/-", "value": {"entity": {}}})];
        assert_eq!(
            store.plan(&ops, true).0,
            Err(PatchError::ReferenceMissing { op: 0 })
        );
    }

    #[test]
    fn after_removing_member_an_append_fails_like_json_patch() {
        let store = Store::of(&["Patient/1"]);
        let ops = [
            json!({"op": "remove", "path": "/member"}),
            json!({"op": "add", "path": "/member/-", "value": member("Patient/2")}),
        ];
        assert!(matches!(
            store.plan(&ops, false).0,
            Err(PatchError::NotFound { op: 1, .. })
        ));
        let plan = store.plan(&ops[..1], false).0.unwrap();
        assert!(!plan.present);
        assert_eq!(plan.member_delta(), -1);
    }

    #[test]
    fn adding_member_replaces_every_slot() {
        let mut store = Store::of(&["Patient/1", "Patient/2"]);
        let ops = [json!({"op": "add", "path": "/member", "value": [member("Patient/3")]})];
        let (result, stats) = store.plan(&ops, false);
        assert!(stats.all);
        let plan = result.unwrap();
        assert_eq!(plan.events.len(), 3);
        store.apply(&plan);
        assert_eq!(references(&store), ["Patient/3"]);
    }

    #[test]
    fn an_absent_member_can_be_added_but_not_appended_to() {
        let mut store = Store::new(&[]);
        store.absent = true;
        let append = [json!({"op": "add", "path": "/member/-", "value": member("Patient/1")})];
        assert!(matches!(
            store.plan(&append, false).0,
            Err(PatchError::NotFound { op: 0, .. })
        ));
        let add = [json!({"op": "add", "path": "/member", "value": [member("Patient/1")]})];
        store.patch(&add, false).unwrap();
        assert_eq!(references(&store), ["Patient/1"]);
        assert!(!store.absent);
    }

    #[test]
    fn a_member_that_is_not_an_array_is_refused() {
        let store = Store::of(&["Patient/1"]);
        let ops = [json!({"op": "replace", "path": "/member", "value": {"a": 1}})];
        assert_eq!(
            store.plan(&ops, false).0,
            Err(PatchError::NotAnArray {
                op: 0,
                found: "an object"
            })
        );
        let back = [
            ops[0].clone(),
            json!({"op": "add", "path": "/member/b", "value": 2}),
            json!({"op": "add", "path": "/member", "value": []}),
        ];
        assert_eq!(store.plan(&back, false).0.unwrap().len, 0);
    }

    #[test]
    fn escaped_pointer_tokens_are_decoded_tilde_one_first() {
        let mut store = Store::of(&["Patient/1"]);
        let ops = [json!({"op": "add", "path": "/member/0/a~1b~01", "value": true})];
        store.patch(&ops, false).unwrap();
        assert_eq!(store.slots[0].element["a/b~1"], json!(true));
    }

    #[test]
    fn removing_an_object_key_reorders_the_rest_as_json_patch_does() {
        let start = json!({"entity": {"reference": "Patient/1"}, "a": 1, "b": 2, "c": 3});
        let mut store = Store::new(std::slice::from_ref(&start));
        let ops = [json!({"op": "remove", "path": "/member/0/a"})];
        store.patch(&ops, false).unwrap();
        let mut doc = json!({"member": [start]});
        json_patch::patch(
            &mut doc,
            &serde_json::from_value::<json_patch::Patch>(json!(ops)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&store.elements()).unwrap(),
            serde_json::to_string(&doc["member"]).unwrap()
        );
        assert_eq!(
            serde_json::to_string(&store.slots[0].element).unwrap(),
            r#"{"entity":{"reference":"Patient/1"},"c":3,"b":2}"#
        );
    }

    #[test]
    fn a_path_outside_member_is_refused() {
        let store = Store::of(&[]);
        for op in [
            json!({"op": "replace", "path": "/name", "value": "x"}),
            json!({"op": "copy", "from": "/name", "path": "/member/0"}),
            json!({"op": "add", "path": "/members", "value": []}),
        ] {
            assert!(matches!(
                store.plan(std::slice::from_ref(&op), false).0,
                Err(PatchError::NotMember { op: 0, .. })
            ));
        }
    }

    #[test]
    fn a_malformed_op_is_refused() {
        let store = Store::of(&[]);
        for op in [
            json!({"op": "add", "path": "/member/-"}),
            json!({"op": "frobnicate", "path": "/member/0"}),
            json!({"op": "remove", "path": "member/0"}),
            json!({"op": "remove", "path": "/member/~2"}),
        ] {
            assert!(matches!(
                store.plan(std::slice::from_ref(&op), false).0,
                Err(PatchError::Malformed { op: 0, .. })
            ));
        }
    }

    #[test]
    fn moving_into_its_own_child_fails() {
        let store = Store::of(&["Patient/1"]);
        let ops = [json!({"op": "move", "from": "/member/0", "path": "/member/0/x"})];
        assert!(matches!(
            store.plan(&ops, false).0,
            Err(PatchError::MoveIntoChild { op: 0, .. })
        ));
    }

    #[test]
    fn the_first_failing_op_is_named_even_when_a_later_one_fails_too() {
        let store = Store::of(&["Patient/1", "Patient/2"]);
        let ops = [
            json!({"op": "test", "path": "/member/1", "value": member("Patient/1")}),
            json!({"op": "remove", "path": "/member/01"}),
        ];
        assert!(matches!(
            store.plan(&ops, false).0,
            Err(PatchError::TestFailed { op: 0, .. })
        ));
    }

    #[test]
    fn positions_before_any_shift_are_asked_for_in_one_round() {
        let store = Store::of(&[
            "Patient/1",
            "Patient/2",
            "Patient/3",
            "Patient/4",
            "Patient/5",
        ]);
        let ops = [
            json!({"op": "remove", "path": "/member/3"}),
            json!({"op": "add", "path": "/member/0/entity/display", "value": "x"}),
            json!({"op": "add", "path": "/member/1", "value": member("Patient/9")}),
            json!({"op": "test", "path": "/member/4", "value": member("Patient/5")}),
        ];
        let (result, stats) = store.plan(&ops, false);
        result.unwrap();
        assert_eq!(stats.rounds, 1);
        assert_eq!(stats.needs[0].positions, BTreeSet::from([0, 1, 3, 4]));
    }

    #[test]
    fn a_caller_that_knows_length_and_floor_saves_the_first_round() {
        let store = Store::of(&["Patient/1", "Patient/2", "Patient/3"]);
        let mut known = Known {
            len: Some(3),
            floor: Some(store.floor.clone()),
            ..Known::default()
        };
        let mut ids = || "new".to_owned();
        let append = [json!({"op": "add", "path": "/member/-", "value": member("Patient/4")})];
        assert!(matches!(
            plan(&append, &known, &mut ids, false),
            Ok(Planned::Done(_))
        ));
        let positional = [
            json!({"op": "remove", "path": "/member/2"}),
            json!({"op": "add", "path": "/member/2", "value": member("Patient/5")}),
        ];
        let Ok(Planned::Need(need)) = plan(&positional, &known, &mut ids, false) else {
            panic!("positions are needed");
        };
        assert_eq!(need.positions, BTreeSet::from([2]));
        store.answer(&need, &mut known);
        assert!(matches!(
            plan(&positional, &known, &mut ids, false),
            Ok(Planned::Done(_))
        ));
    }

    #[test]
    fn counts_follow_the_inactive_flag() {
        let mut store = Store::of(&["Patient/1", "Patient/2"]);
        let ops = [
            json!({"op": "add", "path": "/member/0/inactive", "value": true}),
            json!({"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/3"}, "inactive": true}}),
        ];
        let plan = store.patch(&ops, false).unwrap();
        assert_eq!((plan.member_delta(), plan.active_delta()), (1, -1));
    }

    #[test]
    fn order_keys_are_ordered_and_malformed_ones_are_refused() {
        assert_eq!(order_key::after("").unwrap(), order_key::FIRST);
        assert_eq!(order_key::after("az").unwrap(), "b00");
        assert_eq!(order_key::after("Zz").unwrap(), "a0");
        assert_eq!(order_key::before("a0").unwrap(), "Zz");
        assert_eq!(order_key::before("Z0").unwrap(), "Yzz");
        assert_eq!(order_key::before("a5V").unwrap(), "a5");
        assert_eq!(order_key::between("a5", "a9").unwrap(), "a6");
        assert_eq!(order_key::between("a5", "a6").unwrap(), "a5V");
        assert_eq!(order_key::between("a5", "a5V").unwrap(), "a5U");
        assert_eq!(order_key::between("a5V", "a6").unwrap(), "a5W");
        assert_eq!(order_key::between("a5", "a51").unwrap(), "a50V");
        for bad in ["a", "a0 ", "!0", "a00", "b0", "a0é"] {
            assert!(order_key::after(bad).is_err(), "{bad:?}");
            assert!(order_key::before(bad).is_err(), "{bad:?}");
            assert!(order_key::between(bad, "zz").is_err(), "{bad:?}");
        }
        assert!(order_key::before("").is_err());
        assert!(order_key::between("a6", "a5").is_err());
        assert!(order_key::between("a5", "a5").is_err());
        let top = format!("z{}", "z".repeat(26));
        assert!(matches!(
            order_key::after(&top),
            Err(order_key::KeyError::Exhausted(_))
        ));
        let bottom = format!("A{}", "0".repeat(26));
        assert!(matches!(
            order_key::before(&bottom),
            Err(order_key::KeyError::Exhausted(_))
        ));
    }

    #[test]
    fn a_million_appends_keep_keys_at_five_bytes() {
        let mut key = String::new();
        let mut longest = 0;
        for _ in 0..1_000_000 {
            let next = order_key::after(&key).unwrap();
            assert!(next > key);
            key = next;
            longest = longest.max(key.len());
        }
        println!("1M appends: last key {key}, longest {longest} bytes");
        assert!(longest <= 5);
        let mut key = order_key::FIRST.to_owned();
        for _ in 0..1_000_000 {
            key = order_key::before(&key).unwrap();
        }
        println!("1M prepends: last key {key} ({} bytes)", key.len());
        assert!(key.len() <= 5);
    }

    #[test]
    fn a_thousand_inserts_at_one_spot_grow_keys_slowly() {
        // Each new element before the previous one (add /member/1 again and again).
        let (lo, mut hi) = ("a0".to_owned(), "a1".to_owned());
        for _ in 0..1000 {
            let k = order_key::between(&lo, &hi).unwrap();
            assert!(lo < k && k < hi);
            hi = k;
        }
        let descending = hi.len();
        // Each new element after the previous one (add /member/n+1 after n).
        let (mut lo, hi) = ("a0".to_owned(), "a1".to_owned());
        for _ in 0..1000 {
            let k = order_key::between(&lo, &hi).unwrap();
            assert!(lo < k && k < hi);
            lo = k;
        }
        let ascending = lo.len();
        println!("1000 inserts at one spot: {descending} bytes (before the last), {ascending} bytes (after the last)");
        assert!(descending <= 40 && ascending <= 40);
    }

    #[test]
    fn random_inserts_keep_keys_ordered_and_short() {
        let mut keys = vec![order_key::FIRST.to_owned()];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..10_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state % (keys.len() as u64 + 1)) as usize;
            let key = match (at.checked_sub(1).map(|i| &keys[i]), keys.get(at)) {
                (Some(lo), Some(hi)) => order_key::between(lo, hi).unwrap(),
                (None, Some(hi)) => order_key::before(hi).unwrap(),
                (Some(lo), None) => order_key::after(lo).unwrap(),
                (None, None) => unreachable!(),
            };
            keys.insert(at, key);
        }
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        let longest = keys.iter().map(String::len).max().unwrap_or(0);
        println!("10,000 random inserts: longest key {longest} bytes");
        assert!(longest <= 16);
    }

    #[test]
    fn repeated_inserts_at_one_index_through_the_planner_stay_ordered() {
        let mut store = Store::of(&["Patient/a", "Patient/z"]);
        for i in 0..300 {
            let ops = [
                json!({"op": "add", "path": "/member/1", "value": member(&format!("Patient/{i}"))}),
            ];
            store.patch(&ops, false).unwrap();
        }
        let refs = references(&store);
        assert_eq!(refs.first().map(String::as_str), Some("Patient/a"));
        assert_eq!(refs.get(1).map(String::as_str), Some("Patient/299"));
        assert_eq!(refs.last().map(String::as_str), Some("Patient/z"));
        let longest = store.slots.iter().map(|s| s.key.len()).max().unwrap_or(0);
        println!("300 planned inserts at index 1: longest key {longest} bytes");
    }

    // -----------------------------------------------------------------------
    // Differential test against the json-patch crate

    fn arb_member() -> impl Strategy<Value = Value> {
        (
            0u8..6,
            prop::option::of(any::<bool>()),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(r, inactive, display, period, extension, extra)| {
                let mut entity = Map::new();
                entity.insert("reference".into(), json!(format!("Patient/{r}")));
                if display {
                    entity.insert("display".into(), json!(format!("P{r}")));
                }
                let mut m = Map::new();
                if extra {
                    m.insert("zz".into(), json!(7));
                }
                m.insert("entity".into(), Value::Object(entity));
                if let Some(b) = inactive {
                    m.insert("inactive".into(), json!(b));
                }
                if period {
                    m.insert("period".into(), json!({"start": "2024-01-01"}));
                }
                if extension {
                    m.insert(
                        "extension".into(),
                        json!([{"url": "u", "valueString": "a"}]),
                    );
                }
                Value::Object(m)
            })
    }

    fn arb_op(start: Vec<Value>, extension: bool) -> BoxedStrategy<Value> {
        let len = start.len();
        let tok = prop_oneof![
            16 => (0..len + 3).prop_map(|n| n.to_string()),
            1 => Just("-".to_owned()),
            1 => Just("01".to_owned()),
        ]
        .boxed();
        let sub = prop::sample::select(vec![
            "/entity/display",
            "/entity/reference",
            "/entity",
            "/inactive",
            "/period",
            "/period/start",
            "/extension/0",
            "/extension/-",
            "/missing/x",
            "/zz",
        ]);
        let sub_value = prop::sample::select(vec![
            json!("P1"),
            json!("Patient/1"),
            json!(true),
            json!(false),
            json!({"start": "2024-01-01"}),
            json!({"url": "u", "valueString": "a"}),
            json!(7),
            json!({"reference": "Patient/2"}),
        ]);
        let witness = if start.is_empty() {
            Just(member("Patient/1")).boxed()
        } else {
            prop::sample::select(start.clone()).boxed()
        };
        let whole_start = start.clone();
        let start = start.clone();
        let at = |t: &str| format!("/member/{t}");
        prop_oneof![
            3 => arb_member().prop_map(|v| json!({"op": "add", "path": "/member/-", "value": v})),
            2 => (tok.clone(), arb_member())
                .prop_map(move |(t, v)| json!({"op": "add", "path": at(&t), "value": v})),
            2 => tok.clone().prop_map(move |t| json!({"op": "remove", "path": at(&t)})),
            1 => (tok.clone(), arb_member())
                .prop_map(move |(t, v)| json!({"op": "replace", "path": at(&t), "value": v})),
            1 => (tok.clone(), witness)
                .prop_map(move |(t, v)| json!({"op": "test", "path": at(&t), "value": v})),
            2 => (0..len + 2, arb_member()).prop_map(move |(n, other)| {
                let value = start.get(n).cloned().unwrap_or(other);
                json!({"op": "test", "path": format!("/member/{n}"), "value": value})
            }),
            4 => (tok.clone(), prop::sample::select(vec!["/entity/display", "/inactive", "/period", "/zz", "/extension"]), sub_value.clone())
                .prop_map(|(t, s, v)| json!({"op": "add", "path": format!("/member/{t}{s}"), "value": v})),
            2 => (prop::sample::select(vec!["move", "copy"]), tok.clone(), tok.clone())
                .prop_map(move |(op, f, t)| json!({"op": op, "from": at(&f), "path": at(&t)})),
            3 => (prop::sample::select(vec!["add", "remove", "replace", "test"]), tok.clone(), sub.clone(), sub_value)
                .prop_map(move |(op, t, s, v)| json!({"op": op, "path": format!("/member/{t}{s}"), "value": v})),
            2 => (prop::sample::select(vec!["move", "copy"]), tok.clone(), sub.clone(), tok.clone(), sub.clone())
                .prop_map(|(op, f, fs, t, ts)| json!({"op": op, "from": format!("/member/{f}{fs}"), "path": format!("/member/{t}{ts}")})),
            1 => (prop::sample::select(vec!["move", "copy"]), tok.clone(), tok.clone(), sub.clone())
                .prop_map(|(op, f, t, ts)| json!({"op": op, "from": format!("/member/{f}"), "path": format!("/member/{t}{ts}")})),
            1 => (prop::sample::select(vec!["move", "copy"]), tok.clone(), sub)
                .prop_map(|(op, f, fs)| json!({"op": op, "from": format!("/member/{f}{fs}"), "path": "/member/-"})),
            2 => prop_oneof![
                prop::collection::vec(arb_member(), 0..4).prop_map(|v| json!({"op": "add", "path": "/member", "value": v})),
                prop::collection::vec(arb_member(), 0..4).prop_map(|v| json!({"op": "replace", "path": "/member", "value": v})),
                Just(json!({"op": "remove", "path": "/member"})),
                Just(json!({"op": "test", "path": "/member", "value": whole_start})),
                Just(json!({"op": "test", "path": "/member", "value": []})),
                Just(json!({"op": "add", "path": "/member", "value": "x"})),
                Just(json!({"op": "move", "from": "/member", "path": "/member/0"})),
                Just(json!({"op": "copy", "from": "/member", "path": "/member/0/copies"})),
                tok.clone().prop_map(|t| json!({"op": "move", "from": format!("/member/{t}"), "path": "/member"})),
                tok.prop_map(|t| json!({"op": "copy", "from": format!("/member/{t}/extension"), "path": "/member"})),
            ],
            if extension { 4 } else { 1 } => (0u8..7).prop_map(|r| json!({"op": "remove", "path": "/member/-", "value": member(&format!("Patient/{r}"))})),
        ]
        .boxed()
    }

    fn is_extension_op(op: &Value) -> bool {
        op["op"] == "remove" && op["path"] == "/member/-" && op.get("value").is_some()
    }

    #[derive(Debug, PartialEq)]
    enum Expected {
        Member(Option<Vec<Value>>),
        FailsAt(usize),
        NotAnArray,
    }

    /// The legacy server: json-patch on the whole document, op by op (which
    /// is what `json_patch::patch` does when every op applies), plus the
    /// extension modelled on the document.
    fn reference(start: Option<&[Value]>, ops: &[Value], extension: bool) -> Expected {
        let mut doc = match start {
            Some(members) => json!({ "member": members }),
            None => json!({}),
        };
        for (i, op) in ops.iter().enumerate() {
            if extension && is_extension_op(op) {
                let wanted = entity_reference(&op["value"]).map(str::to_owned);
                let Some(Value::Array(members)) = doc.get_mut("member") else {
                    return Expected::FailsAt(i);
                };
                let before = members.len();
                members.retain(|m| entity_reference(m).map(str::to_owned) != wanted);
                if members.len() == before {
                    return Expected::FailsAt(i);
                }
            } else {
                let parsed: PatchOperation = serde_json::from_value(op.clone()).unwrap();
                if json_patch::patch(&mut doc, &[parsed]).is_err() {
                    return Expected::FailsAt(i);
                }
            }
        }
        match doc.get("member") {
            None => Expected::Member(None),
            Some(Value::Array(members)) => Expected::Member(Some(members.clone())),
            Some(_) => Expected::NotAnArray,
        }
    }

    fn blocking_ops(ops: &[Value], extension: bool) -> usize {
        ops.iter()
            .filter(|op| {
                (extension && is_extension_op(op))
                    || (op["path"] == "/member" && op.get("from").is_some())
            })
            .count()
    }

    fn check(
        start: &[Value],
        absent: bool,
        ops: &[Value],
        extension: bool,
    ) -> Result<(), TestCaseError> {
        let mut store = Store::new(start);
        store.absent = absent;
        let expected = reference((!absent).then_some(start), ops, extension);
        let (result, stats) = store.plan(ops, extension);
        prop_assert!(
            stats.rounds <= 2 + blocking_ops(ops, extension),
            "{} rounds: {:?}",
            stats.rounds,
            stats.needs
        );
        let value_only = ops.iter().all(|op| {
            (op["op"] == "add" && op["path"] == "/member/-") || (extension && is_extension_op(op))
        });
        if value_only {
            prop_assert_eq!(stats.positions, 0);
            prop_assert!(!stats.all);
            prop_assert!(stats.rounds <= 1);
        }
        match (expected, result) {
            (Expected::Member(members), Ok(plan)) => {
                store.apply(&plan);
                prop_assert_eq!(plan.present, members.is_some());
                let want = serde_json::to_string(&members.unwrap_or_default()).unwrap();
                let got = serde_json::to_string(&store.elements()).unwrap();
                prop_assert_eq!(got, want);
            }
            (Expected::FailsAt(i), Err(e)) => prop_assert_eq!(e.op_index(), Some(i), "{}", e),
            (Expected::NotAnArray, Err(PatchError::NotAnArray { .. })) => {}
            (expected, result) => {
                prop_assert!(false, "expected {:?}, planned {:?}", expected, result)
            }
        }
        Ok(())
    }

    fn arb_case() -> impl Strategy<Value = (Vec<Value>, bool, Vec<Value>, bool)> {
        (
            prop::collection::vec(arb_member(), 0..=50),
            any::<bool>(),
            0u8..20,
        )
            .prop_flat_map(|(start, extension, coin)| {
                let absent = start.is_empty() && coin < 5;
                let ops = prop::collection::vec(arb_op(start.clone(), extension), 1..=8);
                (Just(start), Just(absent), ops, Just(extension))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(6000))]

        #[test]
        fn plans_give_exactly_what_json_patch_gives((start, absent, ops, extension) in arb_case()) {
            check(&start, absent, &ops, extension)?;
        }
    }

    fn arb_value_only() -> impl Strategy<Value = (Vec<Value>, Vec<Value>)> {
        let op = prop_oneof![
            arb_member().prop_map(|v| json!({"op": "add", "path": "/member/-", "value": v})),
            (0u8..7).prop_map(|r| json!({"op": "remove", "path": "/member/-", "value": member(&format!("Patient/{r}"))})),
        ];
        (
            prop::collection::vec(arb_member(), 0..=50),
            prop::collection::vec(op, 1..=8),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn value_only_patches_ask_for_no_positions((start, ops) in arb_value_only()) {
            check(&start, false, &ops, true)?;
        }
    }

    #[test]
    fn members_are_found_by_reference_or_else_by_identifier() {
        use serde_json::json;
        assert_eq!(
            match_key(&json!({"entity": {"reference": "Patient/1"}})),
            "Patient/1"
        );
        assert_eq!(
            match_key(&json!({"entity": {"identifier": {"system": "s", "value": "v"}}})),
            "identifier:s|v"
        );
        assert_eq!(match_key(&json!({"entity": {"display": "x"}})), "");
        assert_eq!(match_key(&json!("not an object")), "");
    }
}
