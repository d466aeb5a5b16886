//! Plans a whole-roster replacement (a Group PUT that carries `member`) over
//! stored slots.
//!
//! A PUT sends the complete new array, but most PUTs change little: a client
//! reads the Group, edits a few members and writes it back. Rewriting every
//! slot would cost one event per member of a million-member group, so the
//! plan keeps every stored slot whose element reappears, in the same
//! relative order, under its id and key, and writes events only for the
//! elements that really appeared or disappeared.
//!
//! Keeping a slot is only possible when the elements around it keep their
//! order too: the kept slots must form a subsequence of the stored array
//! that is also a subsequence of the desired one. The plan keeps a longest
//! such subsequence (a longest common subsequence of the two arrays), found
//! as a longest increasing subsequence of matching positions
//! (Hunt–Szymanski) in O(r log n), `r` being the number of candidate pairs.
//! Duplicates could make `r` quadratic, so each desired element considers at
//! most [`CANDIDATES`] equal stored elements, those nearest its rank: with
//! many equal elements the result may then keep a few slots less than the
//! optimum, never a wrong one.

use std::collections::HashMap;

use serde_json::Value;

use crate::fhir::member_array::{order_key, PatchError, Plan, Slot, SlotEvent};

/// How many equal stored elements one desired element may be matched with.
/// Beyond this, equal elements are only matched near their rank, which keeps
/// the matching O(n log n) even for arrays of one repeated element.
const CANDIDATES: usize = 16;

/// How many new keys are made in a row before the rest of a gap is split:
/// consecutive keys in one gap step one digit each, so a long run grows a
/// digit every ~30 keys, while splitting the gap around a few pivots keeps
/// the keys of a thousand-element gap within a few bytes.
const RUN: usize = 30;

/// Plans replacing the stored array by `desired` (`None`: the document will
/// have no `member` key).
///
/// `stored` are the current slots in key order and `floor` the group's
/// append floor (`""` when no key was ever assigned). Elements are compared
/// as serialized JSON, so an element whose keys were reordered counts as
/// changed: the stored bytes are what a read returns, and they must be
/// exactly what the client sent last.
///
/// `ids` is called once per new slot, only when the plan is returned.
pub fn replace_all(
    stored: &[Slot],
    floor: &str,
    desired: Option<&[Value]>,
    ids: &mut dyn FnMut() -> String,
) -> Result<Plan, PatchError> {
    check_stored(stored, floor)?;
    let present = desired.is_some();
    let desired = desired.unwrap_or_default();
    let kept = common_subsequence(stored, desired);

    // New keys, gap by gap: each gap lies between two kept slots (or an end
    // of the array) and holds the desired elements that were not matched.
    let mut new_keys: Vec<(usize, String)> = Vec::new();
    let mut new_floor = None;
    let mut start = 0;
    let mut lower: Option<&str> = None;
    for boundary in kept
        .iter()
        .map(|&(d, s)| Some((d, s)))
        .chain(std::iter::once(None))
    {
        let end = boundary.map_or(desired.len(), |(d, _)| d);
        let count = end - start;
        if count > 0 {
            let upper = boundary
                .and_then(|(_, s)| stored.get(s))
                .map(|s| s.key.as_str());
            let keys = match (lower, upper) {
                (_, None) => {
                    // Past the last kept slot: above the floor, as an append,
                    // so the keys are short and never those of a removed tail.
                    let keys = ascending_after(floor, count)?;
                    new_floor = keys.last().cloned();
                    keys
                }
                (None, Some(hi)) => descending_before(hi, count)?,
                (Some(lo), Some(hi)) => {
                    let mut keys = Vec::with_capacity(count);
                    fill_between(lo, hi, count, &mut keys)?;
                    keys
                }
            };
            new_keys.extend((start..end).zip(keys));
        }
        if let Some((d, s)) = boundary {
            start = d + 1;
            lower = stored.get(s).map(|s| s.key.as_str());
        }
    }

    let mut is_kept = vec![false; stored.len()];
    for &(_, s) in &kept {
        if let Some(flag) = is_kept.get_mut(s) {
            *flag = true;
        }
    }
    let mut events = Vec::with_capacity(new_keys.len() + stored.len() - kept.len());
    for (d, key) in new_keys {
        let after = desired.get(d).cloned().ok_or_else(|| {
            PatchError::InconsistentFacts("a new key was made for no element".into())
        })?;
        events.push(SlotEvent::Put {
            id: ids(),
            key,
            before: None,
            after,
        });
    }
    for (slot, _) in stored.iter().zip(&is_kept).filter(|(_, kept)| !**kept) {
        events.push(SlotEvent::Remove {
            id: slot.id.clone(),
            key: slot.key.clone(),
            before: slot.element.clone(),
        });
    }
    Ok(Plan {
        events,
        len: desired.len(),
        present,
        floor: new_floor,
    })
}

/// Gap keys rely on the slots being in key order and on the floor being
/// above them; a store that breaks either would get colliding keys.
fn check_stored(stored: &[Slot], floor: &str) -> Result<(), PatchError> {
    if let Some(pair) = stored.windows(2).find(|w| w[0].key >= w[1].key) {
        return Err(PatchError::InconsistentFacts(format!(
            "stored slots are not in strictly ascending key order ('{}' before '{}')",
            pair[0].key, pair[1].key
        )));
    }
    if let Some(last) = stored.last() {
        if last.key.as_str() > floor {
            return Err(PatchError::InconsistentFacts(format!(
                "the append floor '{floor}' is below the stored key '{}'",
                last.key
            )));
        }
    }
    Ok(())
}

/// Pairs `(desired index, stored index)` of a common subsequence, both
/// strictly increasing; a longest one unless duplicates hit [`CANDIDATES`].
fn common_subsequence(stored: &[Slot], desired: &[Value]) -> Vec<(usize, usize)> {
    let mut by_text: HashMap<String, Vec<usize>> = HashMap::new();
    for (s, slot) in stored.iter().enumerate() {
        by_text.entry(slot.element.to_string()).or_default().push(s);
    }
    let texts: Vec<String> = desired.iter().map(Value::to_string).collect();
    let mut desired_count: HashMap<&str, usize> = HashMap::new();
    for text in &texts {
        *desired_count.entry(text.as_str()).or_default() += 1;
    }

    // Pairs in desired order and, within one desired element, in descending
    // stored order, so that a strictly increasing run never takes two pairs
    // of the same desired element.
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (d, text) in texts.iter().enumerate() {
        let Some(positions) = by_text.get(text) else {
            continue;
        };
        let rank = seen.entry(text.as_str()).or_default();
        let occurrences = desired_count.get(text.as_str()).copied().unwrap_or(1);
        let window = candidate_window(*rank, occurrences, positions.len());
        *rank += 1;
        pairs.extend(positions[window].iter().rev().map(|&s| (d, s)));
    }

    // Patience sorting on the stored index: `tails[l]` is the pair ending
    // the best increasing run of length l + 1 found so far.
    let mut tails: Vec<usize> = Vec::new();
    let mut previous: Vec<Option<usize>> = vec![None; pairs.len()];
    for (p, &(_, s)) in pairs.iter().enumerate() {
        let at = tails.partition_point(|&t| pairs[t].1 < s);
        previous[p] = at.checked_sub(1).map(|i| tails[i]);
        if at == tails.len() {
            tails.push(p);
        } else {
            tails[at] = p;
        }
    }
    let mut run = Vec::with_capacity(tails.len());
    let mut cursor = tails.last().copied();
    while let Some(p) = cursor {
        run.push(pairs[p]);
        cursor = previous[p];
    }
    run.reverse();
    run
}

/// Which of `stored` equal stored elements the `rank`-th of `desired` equal
/// desired elements may match: all of them when few, else those around the
/// same relative place, where an unedited array would have it.
fn candidate_window(rank: usize, desired: usize, stored: usize) -> std::ops::Range<usize> {
    if stored <= CANDIDATES {
        return 0..stored;
    }
    let centre = rank * stored / desired.max(1);
    let start = centre
        .saturating_sub(CANDIDATES / 2)
        .min(stored - CANDIDATES);
    start..start + CANDIDATES
}

/// `count` ascending keys above `floor`, as appends make them.
fn ascending_after(floor: &str, count: usize) -> Result<Vec<String>, PatchError> {
    let mut keys: Vec<String> = Vec::with_capacity(count);
    for _ in 0..count {
        let key = order_key::after(keys.last().map_or(floor, String::as_str))?;
        keys.push(key);
    }
    Ok(keys)
}

/// `count` ascending keys below `hi`: made downwards, as prepends make them,
/// because stepping the integer down keeps them as short as appends.
fn descending_before(hi: &str, count: usize) -> Result<Vec<String>, PatchError> {
    let mut keys: Vec<String> = Vec::with_capacity(count);
    for _ in 0..count {
        let key = order_key::before(keys.last().map_or(hi, String::as_str))?;
        keys.push(key);
    }
    keys.reverse();
    Ok(keys)
}

/// Pushes `count` ascending keys strictly between `lo` and `hi` onto `out`.
///
/// Up to [`RUN`] keys are made one after the other. More are spread: [`RUN`]
/// pivots first, then the rest split evenly into the gaps around them, and
/// so on, so the key length grows with the logarithm of `count` instead of
/// linearly.
fn fill_between(lo: &str, hi: &str, count: usize, out: &mut Vec<String>) -> Result<(), PatchError> {
    let pivots = count.min(RUN);
    let mut made: Vec<String> = Vec::with_capacity(pivots);
    for _ in 0..pivots {
        let key = order_key::between(made.last().map_or(lo, String::as_str), hi)?;
        made.push(key);
    }
    if count == pivots {
        out.extend(made);
        return Ok(());
    }
    let rest = count - pivots;
    let gaps = pivots + 1;
    let mut left = lo.to_owned();
    for (i, right) in made
        .iter()
        .map(String::as_str)
        .chain(std::iter::once(hi))
        .enumerate()
    {
        let size = rest / gaps + usize::from(i < rest % gaps);
        fill_between(&left, right, size, out)?;
        if i < pivots {
            out.push(right.to_owned());
            left = right.to_owned();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn member(r: &str) -> Value {
        json!({"entity": {"reference": format!("Patient/{r}")}})
    }

    fn slots(elements: &[Value]) -> (Vec<Slot>, String) {
        let mut key = String::new();
        let slots = elements
            .iter()
            .enumerate()
            .map(|(i, element)| {
                key = order_key::after(&key).unwrap();
                Slot {
                    id: format!("s{i}"),
                    key: key.clone(),
                    element: element.clone(),
                }
            })
            .collect();
        (slots, key)
    }

    fn counter() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("new{n}")
        }
    }

    /// The stored slots after the plan, in key order.
    fn apply(stored: &[Slot], plan: &Plan) -> Vec<Slot> {
        let mut by_id: HashMap<String, Slot> =
            stored.iter().map(|s| (s.id.clone(), s.clone())).collect();
        for event in &plan.events {
            match event {
                SlotEvent::Put { id, key, after, .. } => {
                    by_id.insert(
                        id.clone(),
                        Slot {
                            id: id.clone(),
                            key: key.clone(),
                            element: after.clone(),
                        },
                    );
                }
                SlotEvent::Remove { id, .. } => {
                    by_id.remove(id);
                }
            }
        }
        let mut slots: Vec<Slot> = by_id.into_values().collect();
        slots.sort_by(|a, b| a.key.cmp(&b.key));
        slots
    }

    fn elements(slots: &[Slot]) -> Vec<Value> {
        slots.iter().map(|s| s.element.clone()).collect()
    }

    #[test]
    fn an_unchanged_roster_writes_no_event() {
        let members: Vec<Value> = (0..5).map(|i| member(&i.to_string())).collect();
        let (stored, floor) = slots(&members);
        let plan = replace_all(&stored, &floor, Some(&members), &mut counter()).unwrap();
        assert!(plan.events.is_empty());
        assert_eq!((plan.len, plan.present, plan.floor), (5, true, None));
    }

    #[test]
    fn one_new_member_in_the_middle_writes_one_put_between_its_neighbours() {
        let (stored, floor) = slots(&[member("a"), member("c")]);
        let desired = [member("a"), member("b"), member("c")];
        let plan = replace_all(&stored, &floor, Some(&desired), &mut counter()).unwrap();
        let [SlotEvent::Put {
            id,
            key,
            before,
            after,
        }] = plan.events.as_slice()
        else {
            panic!("{:?}", plan.events);
        };
        assert_eq!((id.as_str(), before, after), ("new1", &None, &member("b")));
        assert!(stored[0].key < *key && *key < stored[1].key);
        assert_eq!(plan.floor, None);
        assert_eq!(elements(&apply(&stored, &plan)), desired);
    }

    #[test]
    fn members_appended_at_the_end_go_above_the_floor_and_move_it() {
        let (stored, _) = slots(&[member("a")]);
        // The floor is above the last key, as after a removed tail.
        let floor = "a5";
        let desired = [member("a"), member("b"), member("c")];
        let plan = replace_all(&stored, floor, Some(&desired), &mut counter()).unwrap();
        let keys: Vec<&str> = plan
            .events
            .iter()
            .map(|e| match e {
                SlotEvent::Put { key, .. } | SlotEvent::Remove { key, .. } => key.as_str(),
            })
            .collect();
        assert_eq!(keys, ["a6", "a7"]);
        assert_eq!(plan.floor.as_deref(), Some("a7"));
        assert_eq!(elements(&apply(&stored, &plan)), desired);
    }

    #[test]
    fn members_put_before_the_first_kept_one_get_ascending_keys_below_it() {
        let (stored, floor) = slots(&[member("z")]);
        let desired = [member("x"), member("y"), member("z")];
        let plan = replace_all(&stored, &floor, Some(&desired), &mut counter()).unwrap();
        assert_eq!(plan.events.len(), 2);
        assert_eq!(plan.floor, None);
        assert_eq!(elements(&apply(&stored, &plan)), desired);
    }

    #[test]
    fn removed_members_come_after_the_puts_in_stored_order() {
        let (stored, floor) = slots(&[member("a"), member("b"), member("c"), member("d")]);
        let desired = [member("n"), member("c")];
        let plan = replace_all(&stored, &floor, Some(&desired), &mut counter()).unwrap();
        let kinds: Vec<String> = plan
            .events
            .iter()
            .map(|e| match e {
                SlotEvent::Put { id, .. } => format!("put {id}"),
                SlotEvent::Remove { id, .. } => format!("remove {id}"),
            })
            .collect();
        assert_eq!(kinds, ["put new1", "remove s0", "remove s1", "remove s3"]);
        assert_eq!(plan.len, 2);
        assert_eq!(elements(&apply(&stored, &plan)), desired);
    }

    #[test]
    fn no_member_key_removes_every_slot_and_is_not_present() {
        let (stored, floor) = slots(&[member("a"), member("b")]);
        let plan = replace_all(&stored, &floor, None, &mut counter()).unwrap();
        assert_eq!(plan.events.len(), 2);
        assert!(plan
            .events
            .iter()
            .all(|e| matches!(e, SlotEvent::Remove { .. })));
        assert_eq!((plan.len, plan.present), (0, false));
        let plan = replace_all(&stored, &floor, Some(&[]), &mut counter()).unwrap();
        assert_eq!((plan.len, plan.present), (0, true));
    }

    #[test]
    fn an_empty_group_fills_from_the_first_key() {
        let desired = [member("a"), member("b")];
        let plan = replace_all(&[], "", Some(&desired), &mut counter()).unwrap();
        assert_eq!(plan.floor.as_deref(), Some("a1"));
        assert_eq!(elements(&apply(&[], &plan)), desired);
    }

    #[test]
    fn a_reordered_element_is_a_changed_element() {
        let stored_element = json!({"entity": {"reference": "Patient/1"}, "inactive": true});
        let reordered = json!({"inactive": true, "entity": {"reference": "Patient/1"}});
        let (stored, floor) = slots(std::slice::from_ref(&stored_element));
        let plan = replace_all(
            &stored,
            &floor,
            Some(std::slice::from_ref(&reordered)),
            &mut counter(),
        )
        .unwrap();
        assert_eq!(plan.events.len(), 2);
        let after = apply(&stored, &plan);
        assert_eq!(after[0].element.to_string(), reordered.to_string());
    }

    #[test]
    fn a_moved_member_costs_one_remove_and_one_put() {
        let (stored, floor) = slots(&[member("a"), member("b"), member("c"), member("d")]);
        let desired = [member("b"), member("c"), member("d"), member("a")];
        let plan = replace_all(&stored, &floor, Some(&desired), &mut counter()).unwrap();
        assert_eq!(plan.events.len(), 2);
        assert_eq!(elements(&apply(&stored, &plan)), desired);
    }

    #[test]
    fn duplicates_keep_as_many_slots_as_fit_in_order() {
        // Greedy matching of the first equal element would keep only one.
        let (stored, floor) = slots(&[member("a"), member("b"), member("a")]);
        let desired = [member("b"), member("a")];
        let plan = replace_all(&stored, &floor, Some(&desired), &mut counter()).unwrap();
        let [SlotEvent::Remove { id, .. }] = plan.events.as_slice() else {
            panic!("{:?}", plan.events);
        };
        assert_eq!(id, "s0");
        let desired = [member("a"), member("a"), member("a")];
        let plan = replace_all(&stored, &floor, Some(&desired), &mut counter()).unwrap();
        assert_eq!(plan.events.len(), 2);
        assert_eq!(elements(&apply(&stored, &plan)), desired);
    }

    #[test]
    fn a_long_run_of_equal_elements_keeps_its_slots_and_stays_cheap() {
        let same = member("same");
        let stored_elements = vec![same.clone(); 20_000];
        let (stored, floor) = slots(&stored_elements);
        let mut desired = vec![member("new"); 20];
        desired.extend(stored_elements.iter().cloned());
        let plan = replace_all(&stored, &floor, Some(&desired), &mut counter()).unwrap();
        assert_eq!(plan.events.len(), 20);
        assert_eq!(elements(&apply(&stored, &plan)), desired);
    }

    #[test]
    fn stored_slots_out_of_key_order_or_above_the_floor_are_refused() {
        let (mut stored, floor) = slots(&[member("a"), member("b")]);
        assert!(matches!(
            replace_all(&stored, "a0", Some(&[]), &mut counter()),
            Err(PatchError::InconsistentFacts(_))
        ));
        stored.swap(0, 1);
        assert!(matches!(
            replace_all(&stored, &floor, Some(&[]), &mut counter()),
            Err(PatchError::InconsistentFacts(_))
        ));
    }

    #[test]
    fn a_thousand_inserts_into_one_gap_keep_keys_short() {
        let (stored, floor) = slots(&[member("first"), member("last")]);
        let mut desired = vec![member("first")];
        desired.extend((0..1000).map(|i| member(&i.to_string())));
        desired.push(member("last"));
        let plan = replace_all(&stored, &floor, Some(&desired), &mut counter()).unwrap();
        assert_eq!(plan.events.len(), 1000);
        let after = apply(&stored, &plan);
        assert_eq!(elements(&after), desired);
        assert!(after.windows(2).all(|w| w[0].key < w[1].key));
        let longest = after.iter().map(|s| s.key.len()).max().unwrap_or(0);
        println!("1000 inserts into one gap: longest key {longest} bytes");
        assert!(longest <= 8, "longest key {longest} bytes");
        // The same gap, a second time: the new keys sit between fractions.
        let stored: Vec<Slot> = after[500..502]
            .iter()
            .zip(["s0", "s1"])
            .map(|(slot, id)| Slot {
                id: id.to_owned(),
                ..slot.clone()
            })
            .collect();
        let mut desired = vec![stored[0].element.clone()];
        desired.extend((0..1000).map(|i| member(&format!("again{i}"))));
        desired.push(stored[1].element.clone());
        let plan = replace_all(&stored, "b00", Some(&desired), &mut counter()).unwrap();
        let after = apply(&stored, &plan);
        assert_eq!(elements(&after), desired);
        let longest = after.iter().map(|s| s.key.len()).max().unwrap_or(0);
        println!("1000 more inserts into a fractional gap: longest key {longest} bytes");
        assert!(longest <= 10, "longest key {longest} bytes");
    }

    /// Longest common subsequence length, the slow and obvious way.
    fn lcs(a: &[Value], b: &[Value]) -> usize {
        let mut table = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for i in 0..a.len() {
            for j in 0..b.len() {
                table[i + 1][j + 1] = if a[i] == b[j] {
                    table[i][j] + 1
                } else {
                    table[i][j + 1].max(table[i + 1][j])
                };
            }
        }
        table[a.len()][b.len()]
    }

    fn arb_element() -> impl Strategy<Value = Value> {
        (0u8..5, any::<bool>()).prop_map(|(r, inactive)| {
            if inactive {
                json!({"entity": {"reference": format!("Patient/{r}")}, "inactive": true})
            } else {
                member(&r.to_string())
            }
        })
    }

    /// Stored slots with keys as a history of appends, prepends and inserts
    /// leaves them, and a floor at or above the last key.
    fn arb_stored() -> impl Strategy<Value = (Vec<Slot>, String)> {
        (
            prop::collection::vec((arb_element(), any::<u16>()), 0..=14),
            0u8..3,
        )
            .prop_map(|(items, bump)| {
                let mut keys: Vec<String> = Vec::new();
                let mut floor = String::new();
                for (_, at) in &items {
                    let at = usize::from(*at) % (keys.len() + 1);
                    let key = match (at.checked_sub(1).map(|i| &keys[i]), keys.get(at)) {
                        (Some(lo), Some(hi)) => order_key::between(lo, hi).unwrap(),
                        (None, Some(hi)) => order_key::before(hi).unwrap(),
                        (_, None) => {
                            floor = order_key::after(&floor).unwrap();
                            floor.clone()
                        }
                    };
                    keys.insert(at, key);
                }
                for _ in 0..bump {
                    floor = order_key::after(&floor).unwrap();
                }
                let slots = keys
                    .into_iter()
                    .zip(items)
                    .enumerate()
                    .map(|(i, (key, (element, _)))| Slot {
                        id: format!("s{i}"),
                        key,
                        element,
                    })
                    .collect();
                (slots, floor)
            })
    }

    fn arb_case() -> impl Strategy<Value = (Vec<Slot>, String, Option<Vec<Value>>)> {
        arb_stored().prop_flat_map(|(stored, floor)| {
            let current = elements(&stored);
            // Edits of the stored array keep most of it; fresh arrays test
            // the matching with little in common.
            let edited =
                prop::collection::vec((0u8..4, arb_element()), 0..=4).prop_map(move |edits| {
                    let mut array = current.clone();
                    for (kind, element) in edits {
                        let at = element.to_string().len() % (array.len() + 1);
                        match kind {
                            0 => array.insert(at, element),
                            1 if at < array.len() => {
                                array.remove(at);
                            }
                            2 if at < array.len() => array[at] = element,
                            _ => array.push(element),
                        }
                    }
                    Some(array)
                });
            let desired = prop_oneof![
                4 => edited,
                2 => prop::collection::vec(arb_element(), 0..=14).prop_map(Some),
                1 => Just(None),
            ];
            (Just(stored), Just(floor), desired)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn applying_the_plan_gives_exactly_the_desired_array((stored, floor, desired) in arb_case()) {
            let plan = replace_all(&stored, &floor, desired.as_deref(), &mut counter()).unwrap();
            let want = desired.clone().unwrap_or_default();
            let after = apply(&stored, &plan);
            prop_assert_eq!(
                after.iter().map(|s| s.element.to_string()).collect::<Vec<_>>(),
                want.iter().map(Value::to_string).collect::<Vec<_>>()
            );
            prop_assert!(after.windows(2).all(|w| w[0].key < w[1].key), "keys collide");
            prop_assert!(after.iter().all(|s| order_key::is_valid(&s.key)));
            prop_assert_eq!((plan.len, plan.present), (want.len(), desired.is_some()));

            // At most one event per slot; stored slots are only ever removed
            // (a kept slot writes nothing), new slots only ever put.
            let mut touched = std::collections::HashSet::new();
            for event in &plan.events {
                match event {
                    SlotEvent::Put { id, before, .. } => {
                        prop_assert!(before.is_none());
                        prop_assert!(id.starts_with("new"));
                        prop_assert!(touched.insert(id.clone()));
                    }
                    SlotEvent::Remove { id, .. } => prop_assert!(touched.insert(id.clone())),
                }
            }
            let survivors = after.iter().filter(|s| s.id.starts_with('s')).count();
            for slot in after.iter().filter(|s| s.id.starts_with('s')) {
                let original = stored.iter().find(|s| s.id == slot.id).unwrap();
                prop_assert_eq!(original, slot);
            }
            // Few enough duplicates here for the matching to be optimal.
            prop_assert_eq!(survivors, lcs(&elements(&stored), &want));

            // The floor stays at or above every key, and moves only upwards.
            let floor_now = plan.floor.clone().unwrap_or_else(|| floor.clone());
            prop_assert!(plan.floor.as_ref().is_none_or(|f| *f > floor));
            prop_assert!(after.iter().all(|s| s.key <= floor_now));
        }
    }
}
