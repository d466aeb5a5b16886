//! A whole roster (a `PUT`, a migration) replacing the stored slots, as a
//! [`Plan`] that writes only what changed: stored elements that the new
//! roster keeps, in the same relative order, keep their slot (no event);
//! the rest are removed, and new elements get keys between their kept
//! neighbours. Pure: the caller passes the stored slots in key order.

use serde_json::Value;

use crate::fhir::member_array::{order_key, PatchError, Plan, Slot, SlotEvent};

/// The plan that turns `stored` (in key order) into exactly `desired`
/// (`None`: the document loses its `member` key). `floor` is the group's
/// append floor; `ids` makes fresh slot ids.
pub fn replace_all(
    stored: &[Slot],
    floor: &str,
    desired: Option<&[Value]>,
    ids: &mut dyn FnMut() -> String,
) -> Result<Plan, PatchError> {
    let wanted = desired.unwrap_or_default();
    let kept = kept_pairs(stored, wanted);
    let mut events = Vec::new();
    let mut new_floor = floor.to_owned();
    let mut raised = false;
    // Walk the desired elements; between two kept slots, new keys go
    // strictly between their keys, one after another.
    let mut next_kept = kept.iter().peekable();
    let mut lower: Option<String> = None;
    for (position, element) in wanted.iter().enumerate() {
        if let Some(&&(at, slot_index)) = next_kept.peek() {
            if at == position {
                next_kept.next();
                lower = Some(stored[slot_index].key.clone());
                continue;
            }
        }
        let upper = next_kept.peek().map(|&&(_, s)| stored[s].key.as_str());
        let key = match (lower.as_deref(), upper) {
            (Some(lo), Some(hi)) => order_key::between(lo, hi)?,
            (None, Some(hi)) => order_key::before(hi)?,
            // Past the last kept slot: above every key ever assigned, so a
            // removed slot's key is never handed out again.
            (_, None) => {
                let above = match lower.as_deref() {
                    Some(lo) if lo > new_floor.as_str() => lo.to_owned(),
                    _ => new_floor.clone(),
                };
                let key = order_key::after(&above)?;
                new_floor = key.clone();
                raised = true;
                key
            }
        };
        events.push(SlotEvent::Put {
            id: ids(),
            key: key.clone(),
            before: None,
            after: element.clone(),
        });
        lower = Some(key);
    }
    let mut is_kept = vec![false; stored.len()];
    for &(_, slot_index) in &kept {
        is_kept[slot_index] = true;
    }
    for (slot, kept) in stored.iter().zip(is_kept) {
        if !kept {
            events.push(SlotEvent::Remove {
                id: slot.id.clone(),
                key: slot.key.clone(),
                before: slot.element.clone(),
            });
        }
    }
    Ok(Plan {
        events,
        len: wanted.len(),
        present: desired.is_some(),
        floor: raised.then_some(new_floor),
    })
}

/// `(position in desired, index in stored)` of the slots kept: a longest
/// common subsequence would be optimal but costs O(n·m); this keeps, for
/// each desired element, the first equal stored slot after the last one
/// kept, which keeps everything when the roster is unchanged or only
/// appended to, inserted into or removed from. Elements compare by value.
fn kept_pairs(stored: &[Slot], desired: &[Value]) -> Vec<(usize, usize)> {
    use std::collections::{HashMap, VecDeque};
    let mut by_text: HashMap<String, VecDeque<usize>> = HashMap::new();
    for (index, slot) in stored.iter().enumerate() {
        by_text
            .entry(slot.element.to_string())
            .or_default()
            .push_back(index);
    }
    let mut kept = Vec::new();
    let mut last: Option<usize> = None;
    for (position, element) in desired.iter().enumerate() {
        let Some(candidates) = by_text.get_mut(&element.to_string()) else {
            continue;
        };
        while candidates
            .front()
            .is_some_and(|&i| last.is_some_and(|l| i <= l))
        {
            candidates.pop_front();
        }
        if let Some(index) = candidates.pop_front() {
            kept.push((position, index));
            last = Some(index);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slots(elements: &[Value]) -> (Vec<Slot>, String) {
        let mut key = String::new();
        let slots = elements
            .iter()
            .enumerate()
            .map(|(i, element)| {
                key = order_key::after(&key).unwrap();
                Slot {
                    id: format!("old{i}"),
                    key: key.clone(),
                    element: element.clone(),
                }
            })
            .collect();
        (slots, key)
    }

    /// The array after `plan`: stored slots with the events applied, by key.
    fn applied(stored: &[Slot], plan: &Plan) -> Vec<Value> {
        let mut by_id: std::collections::BTreeMap<String, (String, Value)> = stored
            .iter()
            .map(|s| (s.id.clone(), (s.key.clone(), s.element.clone())))
            .collect();
        for event in &plan.events {
            match event {
                SlotEvent::Put { id, key, after, .. } => {
                    by_id.insert(id.clone(), (key.clone(), after.clone()));
                }
                SlotEvent::Remove { id, .. } => {
                    by_id.remove(id);
                }
            }
        }
        let mut rows: Vec<(String, Value)> = by_id.into_values().collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let keys: Vec<&String> = rows.iter().map(|r| &r.0).collect();
        assert!(
            keys.windows(2).all(|w| w[0] < w[1]),
            "keys ascend: {keys:?}"
        );
        rows.into_iter().map(|r| r.1).collect()
    }

    fn m(n: u64) -> Value {
        json!({"entity": {"reference": format!("Patient/{n}")}})
    }

    fn fresh() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("new{n}")
        }
    }

    #[test]
    fn an_unchanged_roster_writes_nothing_and_an_appended_one_only_the_new_members() {
        let (stored, floor) = slots(&[m(1), m(2), m(1)]);
        let same = replace_all(&stored, &floor, Some(&[m(1), m(2), m(1)]), &mut fresh()).unwrap();
        assert!(same.events.is_empty());
        assert_eq!(same.floor, None);
        let grown = replace_all(
            &stored,
            &floor,
            Some(&[m(1), m(2), m(1), m(3)]),
            &mut fresh(),
        )
        .unwrap();
        assert_eq!(grown.events.len(), 1);
        assert!(grown.floor.as_deref() > Some(floor.as_str()));
        assert_eq!(applied(&stored, &grown), vec![m(1), m(2), m(1), m(3)]);
    }

    #[test]
    fn inserts_removals_and_reorders_give_exactly_the_desired_array() {
        let (stored, floor) = slots(&[m(1), m(2), m(3), m(4)]);
        for desired in [
            vec![m(0), m(1), m(5), m(3), m(4)],
            vec![m(4), m(3), m(2), m(1)],
            vec![],
            vec![m(2), m(2), m(2)],
            vec![m(9)],
        ] {
            let plan = replace_all(&stored, &floor, Some(&desired), &mut fresh()).unwrap();
            assert_eq!(applied(&stored, &plan), desired);
            assert_eq!((plan.len, plan.present), (desired.len(), true));
        }
        let gone = replace_all(&stored, &floor, None, &mut fresh()).unwrap();
        assert!(!gone.present);
        assert_eq!(gone.events.len(), 4);
    }

    #[test]
    fn random_rosters_replace_random_rosters_exactly() {
        let mut state = 0x1234_5678_9abc_def1_u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for _ in 0..500 {
            let old: Vec<Value> = (0..next(12)).map(|_| m(next(6))).collect();
            let new: Vec<Value> = (0..next(12)).map(|_| m(next(6))).collect();
            let (stored, floor) = slots(&old);
            let plan = replace_all(&stored, &floor, Some(&new), &mut fresh()).unwrap();
            assert_eq!(applied(&stored, &plan), new, "{old:?} -> {new:?}");
            let puts = plan
                .events
                .iter()
                .filter(|e| matches!(e, SlotEvent::Put { .. }))
                .count();
            assert!(puts <= new.len());
        }
    }

    #[test]
    fn a_thousand_inserts_into_one_gap_keep_keys_short() {
        let (stored, floor) = slots(&[m(1), m(2)]);
        let mut desired = vec![m(1)];
        desired.extend((0..1000).map(|n| m(100 + n)));
        desired.push(m(2));
        let plan = replace_all(&stored, &floor, Some(&desired), &mut fresh()).unwrap();
        assert_eq!(applied(&stored, &plan), desired);
        let longest = plan
            .events
            .iter()
            .map(|e| match e {
                SlotEvent::Put { key, .. } | SlotEvent::Remove { key, .. } => key.len(),
            })
            .max()
            .unwrap();
        assert!(longest <= 40, "{longest}");
    }
}
