//! Da Vinci ATR `$member-add` / `$member-remove` on a Group, planned over
//! stored member slots.
//!
//! What the IG asks (Da Vinci Member Attribution List, STU 2.1.0,
//! <https://hl7.org/fhir/us/davinci-atr/OperationDefinition-member-add.html>,
//! <https://hl7.org/fhir/us/davinci-atr/OperationDefinition-member-remove.html>,
//! data model: <https://hl7.org/fhir/us/davinci-atr/spec.html>):
//!
//! * `$member-add` takes `memberId` + `providerNpi` or `patientReference` +
//!   `providerReference`, each optionally with `attributionPeriod` (every
//!   parameter 0..1). The period goes to `Group.member.period`, the provider
//!   to the `ext-attributedProvider` extension on the member.
//! * A member attributed to several providers is listed once per provider.
//!   So an add for a provider the member is not yet attributed to appends a
//!   new entry instead of overwriting another provider's entry.
//! * `$member-remove` takes `memberId` (optionally + `providerNpi`) or
//!   `patientReference` (optionally + `providerReference`, optionally +
//!   `coverageReference`); it has no `attributionPeriod`. It "removes all
//!   attributions" for the member, or for the member and provider (and
//!   coverage). While the list is a draft the member stays listed with
//!   `inactive: true`, which is what [`atr_plan`] does; the IG also says an
//!   `open` list SHOULD drop the member and a `final` list SHALL refuse both
//!   operations, which the caller decides with [`attribution_list_status`].
//!
//! Parameters are checked strictly (unknown, repeated or ill-typed ones are
//! refused) because a parameter ignored here would be an attribution the
//! client believes recorded.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::fhir::member_array::{order_key, Plan, Slot, SlotEvent};
use crate::fhir::outcome::{IssueType, Outcome};
use crate::fhir::reference::parse_reference;

/// The ATR extension naming a member's attributed provider.
pub const ATTRIBUTED_PROVIDER_URL: &str =
    "http://hl7.org/fhir/us/davinci-atr/StructureDefinition/ext-attributedProvider";
/// The ATR extension naming the Coverage a member is listed for.
pub const COVERAGE_REFERENCE_URL: &str =
    "http://hl7.org/fhir/us/davinci-atr/StructureDefinition/ext-coverageReference";
/// The ATR extension on the Group holding its attribution list status.
pub const ATTRIBUTION_LIST_STATUS_URL: &str =
    "http://hl7.org/fhir/us/davinci-atr/StructureDefinition/ext-attributionListStatus";
/// The identifier system of US National Provider Identifiers.
pub const NPI_SYSTEM: &str = "http://hl7.org/fhir/sid/us-npi";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtrOperation {
    /// Adds (or re-activates) the member, with `attributionPeriod` as its period.
    MemberAdd,
    /// Marks the member inactive, as ATR asks of draft lists, keeping it listed.
    MemberRemove,
}

impl AtrOperation {
    pub fn from_path_segment(segment: &str) -> Option<Self> {
        match segment {
            "$member-add" => Some(AtrOperation::MemberAdd),
            "$member-remove" => Some(AtrOperation::MemberRemove),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            AtrOperation::MemberAdd => "$member-add",
            AtrOperation::MemberRemove => "$member-remove",
        }
    }

    fn parameters(self) -> &'static [&'static str] {
        match self {
            AtrOperation::MemberAdd => &[
                "memberId",
                "providerNpi",
                "patientReference",
                "providerReference",
                "attributionPeriod",
            ],
            AtrOperation::MemberRemove => &[
                "memberId",
                "providerNpi",
                "patientReference",
                "providerReference",
                "coverageReference",
            ],
        }
    }
}

/// One member an ATR operation is about.
#[derive(Debug, Clone, PartialEq)]
pub struct AtrMember {
    /// [`match_key`] of `element`: the stored slots to look at are those
    /// whose element has the same match key.
    pub match_key: String,
    /// For `$member-add`, the member element to store: `entity`, then
    /// `period` and the attributed-provider `extension` when given. For
    /// `$member-remove`, the same shape naming what to remove: `entity`,
    /// and the provider and coverage extensions that narrow it.
    pub element: Value,
}

/// The key under which a member element is looked up: its
/// `entity.reference`, or `identifier:{system}|{value}` for an entity known
/// only by identifier (ATR's `memberId`). `None` for an element that no ATR
/// operation can name.
pub fn match_key(element: &Value) -> Option<String> {
    let key = crate::fhir::member_array::match_key(element);
    (!key.is_empty()).then_some(key)
}

/// The Group's ATR attribution list status (`draft`, `open`, `final`), which
/// decides whether the IG allows these operations at all.
pub fn attribution_list_status(group: &Value) -> Option<&str> {
    group
        .get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(ATTRIBUTION_LIST_STATUS_URL))?
        .get("valueCode")?
        .as_str()
}

// ---------------------------------------------------------------------------
// Parsing the Parameters body

/// The members an ATR operation's `Parameters` body is about (one: every
/// ATR parameter is 0..1).
pub fn parse_atr_parameters(
    operation: AtrOperation,
    body: &[u8],
) -> Result<Vec<AtrMember>, Outcome> {
    let parameters: Value = serde_json::from_slice(body).map_err(|e| {
        Outcome::error(
            400,
            IssueType::Invalid,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if parameters.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(Outcome::error(
            400,
            IssueType::Invalid,
            format!(
                "the body of {} must be a Parameters resource",
                operation.name()
            ),
        ));
    }
    let list: &[Value] = match parameters.get("parameter") {
        None => &[],
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(Outcome::error(
                400,
                IssueType::Structure,
                "Parameters.parameter must be an array",
            )
            .at("Parameters.parameter"))
        }
    };
    let given = named_parameters(operation, list)?;
    let get = |name: &str| given.get(name).map(|(i, p)| (*i, *p));

    let provider_npi = get("providerNpi").map(provider_npi).transpose()?;
    let provider_reference = get("providerReference")
        .map(|p| reference(p, "providerReference", PROVIDER_TYPES))
        .transpose()?;
    let coverage = get("coverageReference")
        .map(|p| reference(p, "coverageReference", &["Coverage"]))
        .transpose()?;
    let period = get("attributionPeriod").map(period).transpose()?;

    let entity = match (get("memberId"), get("patientReference")) {
        (Some(_), Some((i, _))) => {
            return Err(Outcome::error(
                422,
                IssueType::Invalid,
                "memberId and patientReference both name the member: send one of them",
            )
            .at(format!("Parameters.parameter[{i}]")))
        }
        (Some(p), None) => json!({ "identifier": member_id(p)? }),
        (None, Some(p)) => json!({ "reference": reference(p, "patientReference", &["Patient"])? }),
        (None, None) => {
            let provider = ["providerNpi", "providerReference", "coverageReference"]
                .into_iter()
                .find(|name| given.contains_key(name));
            let why = match provider {
                Some(name) => format!(
                    "{name} narrows the attribution of a member, but no memberId or \
                     patientReference names the member"
                ),
                None => format!(
                    "{} needs the member: a memberId or a patientReference parameter",
                    operation.name()
                ),
            };
            return Err(Outcome::error(422, IssueType::Required, why));
        }
    };
    let provider = match (provider_npi, provider_reference) {
        (Some(_), Some(_)) => return Err(Outcome::error(
            422,
            IssueType::Invalid,
            "providerNpi and providerReference both name the attributed provider: send one of them",
        )),
        (Some(npi), None) => Some(json!({ "identifier": { "system": NPI_SYSTEM, "value": npi } })),
        (None, Some(reference)) => Some(json!({ "reference": reference })),
        (None, None) => None,
    };

    let mut element = Map::new();
    element.insert("entity".into(), entity);
    if let Some(period) = period {
        element.insert("period".into(), period);
    }
    let mut extensions = Vec::new();
    if let Some(provider) = provider {
        extensions.push(json!({ "url": ATTRIBUTED_PROVIDER_URL, "valueReference": provider }));
    }
    if let Some(coverage) = coverage {
        extensions.push(
            json!({ "url": COVERAGE_REFERENCE_URL, "valueReference": { "reference": coverage } }),
        );
    }
    if !extensions.is_empty() {
        element.insert("extension".into(), Value::Array(extensions));
    }
    let element = Value::Object(element);
    let match_key = match_key(&element).ok_or_else(|| {
        Outcome::error(
            500,
            IssueType::Exception,
            "a member built from the parameters has no match key",
        )
    })?;
    Ok(vec![AtrMember { match_key, element }])
}

/// The provider types `ext-attributedProvider` allows.
const PROVIDER_TYPES: &[&str] = &["Practitioner", "PractitionerRole", "Organization"];

/// Parameters by name, each with its index for error locations.
fn named_parameters(
    operation: AtrOperation,
    list: &[Value],
) -> Result<HashMap<&'static str, (usize, &Value)>, Outcome> {
    let mut given: HashMap<&'static str, (usize, &Value)> = HashMap::new();
    for (i, parameter) in list.iter().enumerate() {
        let at = format!("Parameters.parameter[{i}]");
        let Some(name) = parameter.get("name").and_then(Value::as_str) else {
            return Err(Outcome::error(
                400,
                IssueType::Structure,
                "every Parameters.parameter needs a name",
            )
            .at(at));
        };
        let Some(&known) = operation.parameters().iter().find(|&&p| p == name) else {
            let why = if name == "attributionPeriod" {
                // The previous version of this proxy took it; the IG's
                // $member-remove never had it.
                "$member-remove has no attributionPeriod parameter: it marks the member \
                 inactive; send $member-add with the new attributionPeriod to change the period"
                    .to_owned()
            } else {
                format!(
                    "'{name}' is not a parameter of {} (it takes {})",
                    operation.name(),
                    operation.parameters().join(", ")
                )
            };
            return Err(Outcome::error(422, IssueType::NotSupported, why).at(at));
        };
        if given.insert(known, (i, parameter)).is_some() {
            return Err(Outcome::error(
                422,
                IssueType::Invalid,
                format!("parameter {name} is given more than once (it is 0..1)"),
            )
            .at(at));
        }
    }
    Ok(given)
}

fn bad_value(index: usize, field: &str, why: String) -> Outcome {
    Outcome::error(422, IssueType::Value, why).at(format!("Parameters.parameter[{index}].{field}"))
}

/// The parameter's `value[x]`, which must be `field` and nothing else.
fn value_of<'a>(
    (index, parameter): (usize, &'a Value),
    name: &str,
    field: &str,
) -> Result<&'a Map<String, Value>, Outcome> {
    let other = parameter
        .as_object()
        .and_then(|p| {
            p.keys().find(|k| {
                (k.starts_with("value") && *k != field) || *k == "resource" || *k == "part"
            })
        })
        .cloned();
    if let Some(other) = other {
        return Err(bad_value(
            index,
            &other,
            format!("parameter {name} takes {field}, not {other}"),
        ));
    }
    parameter
        .get(field)
        .and_then(Value::as_object)
        .ok_or_else(|| {
            bad_value(
                index,
                field,
                format!("parameter {name} needs a {field} object"),
            )
        })
}

fn string_field<'a>(object: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match object.get(key) {
        None => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s)),
        Some(_) => Err(format!("'{key}' must be a non-empty string")),
    }
}

fn member_id(parameter: (usize, &Value)) -> Result<Value, Outcome> {
    let index = parameter.0;
    let identifier = value_of(parameter, "memberId", "valueIdentifier")?;
    let bad = |why: String| bad_value(index, "valueIdentifier", format!("memberId: {why}"));
    let system = string_field(identifier, "system").map_err(bad)?;
    let value = string_field(identifier, "value").map_err(bad)?;
    let (Some(system), Some(value)) = (system, value) else {
        // Without a system a member id could be any payer's, and matching
        // it against stored identifiers would guess.
        return Err(bad("needs both system and value".into()));
    };
    if system.contains('|') {
        // The match key joins system and value with '|'.
        return Err(bad(format!("system '{system}' must not contain '|'")));
    }
    Ok(json!({ "system": system, "value": value }))
}

fn provider_npi(parameter: (usize, &Value)) -> Result<String, Outcome> {
    let index = parameter.0;
    let identifier = value_of(parameter, "providerNpi", "valueIdentifier")?;
    let bad = |why: String| bad_value(index, "valueIdentifier", format!("providerNpi: {why}"));
    if let Some(system) = string_field(identifier, "system").map_err(bad)? {
        if system != NPI_SYSTEM {
            return Err(bad(format!(
                "system must be {NPI_SYSTEM} (or left out), not '{system}'"
            )));
        }
    }
    let value = string_field(identifier, "value")
        .map_err(bad)?
        .ok_or_else(|| bad("needs a value".into()))?;
    if value.len() != 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(format!("'{value}' is not an NPI (10 digits)")));
    }
    Ok(value.to_owned())
}

fn reference(parameter: (usize, &Value), name: &str, types: &[&str]) -> Result<String, Outcome> {
    let index = parameter.0;
    let value = value_of(parameter, name, "valueReference")?;
    let bad = |why: String| bad_value(index, "valueReference", format!("{name}: {why}"));
    let text = string_field(value, "reference")
        .map_err(bad)?
        .ok_or_else(|| {
            bad("needs a reference (Type/id); logical references are not looked up".into())
        })?;
    let reference = parse_reference(text).map_err(bad)?;
    if !types.contains(&reference.resource_type()) {
        return Err(bad(format!(
            "'{text}' must reference {}",
            types.join(" or ")
        )));
    }
    Ok(reference.as_str().to_owned())
}

fn period(parameter: (usize, &Value)) -> Result<Value, Outcome> {
    let index = parameter.0;
    let period = value_of(parameter, "attributionPeriod", "valuePeriod")?;
    let bad = |why: String| bad_value(index, "valuePeriod", format!("attributionPeriod: {why}"));
    if let Some(other) = period.keys().find(|k| *k != "start" && *k != "end") {
        return Err(bad(format!(
            "'{other}' is not stored; send start and end only"
        )));
    }
    let start = string_field(period, "start").map_err(bad)?;
    let end = string_field(period, "end").map_err(bad)?;
    if start.is_none() && end.is_none() {
        return Err(bad("needs a start or an end".into()));
    }
    for bound in [start, end].into_iter().flatten() {
        if !is_date_time(bound) {
            return Err(bad(format!("'{bound}' is not a FHIR dateTime")));
        }
    }
    if let (Some(start), Some(end)) = (start, end) {
        // Same-precision dates compare as text; times with zones would need
        // real arithmetic, and a wrong refusal is worse than none.
        if start.len() == end.len() && !start.contains('T') && start > end {
            return Err(bad(format!("start {start} is after end {end}")));
        }
    }
    let mut out = Map::new();
    for (key, bound) in [("start", start), ("end", end)] {
        if let Some(bound) = bound {
            out.insert(key.into(), Value::String(bound.to_owned()));
        }
    }
    Ok(Value::Object(out))
}

/// FHIR `dateTime`: `YYYY`, `YYYY-MM`, `YYYY-MM-DD`, or a full time with
/// optional fraction and a mandatory zone.
fn is_date_time(text: &str) -> bool {
    let number = |from: usize, to: usize| -> Option<u32> {
        let part = text.get(from..to)?;
        if part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let at = |i: usize| text.as_bytes().get(i).copied();
    let in_range = |from, to, lo, hi| number(from, to).is_some_and(|n| (lo..=hi).contains(&n));
    if !in_range(0, 4, 1, 9999) {
        return false;
    }
    match text.len() {
        4 => return true,
        7 => return at(4) == Some(b'-') && in_range(5, 7, 1, 12),
        10 => {
            return at(4) == Some(b'-')
                && in_range(5, 7, 1, 12)
                && at(7) == Some(b'-')
                && in_range(8, 10, 1, 31)
        }
        n if n < 20 => return false,
        _ => {}
    }
    let time = at(4) == Some(b'-')
        && in_range(5, 7, 1, 12)
        && at(7) == Some(b'-')
        && in_range(8, 10, 1, 31)
        && at(10) == Some(b'T')
        && in_range(11, 13, 0, 23)
        && at(13) == Some(b':')
        && in_range(14, 16, 0, 59)
        && at(16) == Some(b':')
        && in_range(17, 19, 0, 60);
    if !time {
        return false;
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=9).contains(&digits) {
            return false;
        }
        rest = &fraction[digits..];
    }
    if rest == "Z" {
        return true;
    }
    let two_digits = |part: Option<&str>, max: u32| {
        part.filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|n| n <= max)
    };
    rest.len() == 6
        && (rest.starts_with('+') || rest.starts_with('-'))
        && rest.get(3..4) == Some(":")
        && two_digits(rest.get(1..3), 14)
        && two_digits(rest.get(4..6), 59)
}

// ---------------------------------------------------------------------------
// Planning

/// A slot as the plan changes it.
struct Working {
    /// `None` for a new slot: ids are only drawn once the plan stands.
    id: Option<String>,
    key: String,
    before: Option<Value>,
    after: Value,
}

/// Plans `members` (from [`parse_atr_parameters`]) against the stored
/// slots. `found[match_key]` must hold, in key order, every stored slot whose
/// [`match_key`] is that of a member asked about (an empty list when there is
/// none); `len` is the stored length and `floor` the append floor.
pub fn atr_plan(
    operation: AtrOperation,
    members: &[AtrMember],
    found: &HashMap<String, Vec<Slot>>,
    len: usize,
    floor: &str,
    ids: &mut dyn FnMut() -> String,
) -> Result<Plan, Outcome> {
    let mut slots: Vec<Working> = Vec::new();
    let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut floor = floor.to_owned();
    let mut appended = 0;
    for member in members {
        if !by_key.contains_key(member.match_key.as_str()) {
            let stored = found.get(&member.match_key).ok_or_else(|| {
                Outcome::error(
                    500,
                    IssueType::Exception,
                    format!(
                        "the member store was not asked about '{}'",
                        member.match_key
                    ),
                )
            })?;
            let mut indexes = Vec::with_capacity(stored.len());
            for slot in stored {
                indexes.push(slots.len());
                slots.push(Working {
                    id: Some(slot.id.clone()),
                    key: slot.key.clone(),
                    before: Some(slot.element.clone()),
                    after: slot.element.clone(),
                });
            }
            by_key.insert(member.match_key.as_str(), indexes);
        }
        let candidates = by_key
            .get(member.match_key.as_str())
            .cloned()
            .unwrap_or_default();
        let provider = extension_reference_key(&member.element, ATTRIBUTED_PROVIDER_URL);
        match operation {
            AtrOperation::MemberAdd => {
                let targets = add_targets(&slots, &candidates, provider.as_deref());
                if targets.is_empty() {
                    let key = order_key::after(&floor).map_err(key_exhausted)?;
                    floor = key.clone();
                    appended += 1;
                    by_key
                        .entry(member.match_key.as_str())
                        .or_default()
                        .push(slots.len());
                    slots.push(Working {
                        id: None,
                        key,
                        before: None,
                        after: member.element.clone(),
                    });
                }
                for i in targets {
                    if let Some(slot) = slots.get_mut(i) {
                        re_add(&mut slot.after, &member.element)?;
                    }
                }
            }
            AtrOperation::MemberRemove => {
                let coverage = extension_reference_key(&member.element, COVERAGE_REFERENCE_URL);
                let targets: Vec<usize> = candidates
                    .into_iter()
                    .filter(|&i| {
                        slots.get(i).is_some_and(|slot| {
                            let has = |url, want: &Option<String>| {
                                want.is_none() || extension_reference_key(&slot.after, url) == *want
                            };
                            has(ATTRIBUTED_PROVIDER_URL, &provider)
                                && has(COVERAGE_REFERENCE_URL, &coverage)
                        })
                    })
                    .collect();
                if targets.is_empty() {
                    return Err(not_listed(member, provider.as_deref(), coverage.as_deref()));
                }
                for i in targets {
                    if let Some(Value::Object(element)) = slots.get_mut(i).map(|s| &mut s.after) {
                        // Inserting an existing key keeps its place, so an
                        // `"inactive": false` is flipped where it stands.
                        element.insert("inactive".into(), Value::Bool(true));
                    }
                }
            }
        }
    }

    let mut events = Vec::new();
    for slot in slots {
        if slot.before.as_ref() == Some(&slot.after) {
            continue;
        }
        events.push(SlotEvent::Put {
            id: slot.id.unwrap_or_else(&mut *ids),
            key: slot.key,
            before: slot.before,
            after: slot.after,
        });
    }
    Ok(Plan {
        events,
        len: len + appended,
        present: true,
        floor: (appended > 0).then_some(floor),
    })
}

/// Which of a member's entries an add updates. With a provider: the entry
/// attributed to that provider, else an entry attributed to nobody (which
/// the add then attributes); an entry of another provider is another
/// attribution and stays as it is. Without a provider: every entry, as a
/// remove without a provider marks every entry.
fn add_targets(slots: &[Working], candidates: &[usize], provider: Option<&str>) -> Vec<usize> {
    let Some(provider) = provider else {
        return candidates.to_vec();
    };
    let provider_of = |i: &usize| {
        slots
            .get(*i)
            .and_then(|s| extension_reference_key(&s.after, ATTRIBUTED_PROVIDER_URL))
    };
    let same: Vec<usize> = candidates
        .iter()
        .filter(|i| provider_of(i).as_deref() == Some(provider))
        .copied()
        .collect();
    if !same.is_empty() {
        return same;
    }
    candidates
        .iter()
        .filter(|i| provider_of(i).is_none())
        .copied()
        .collect()
}

/// Applies an add to a stored entry, keeping everything it does not set
/// verbatim and in place.
fn re_add(stored: &mut Value, added: &Value) -> Result<(), Outcome> {
    // An entry that already names a provider keeps its own extension (it may
    // carry a display the request lacks): add_targets only picks it when it
    // names the requested one.
    let attributed = extension_reference_key(stored, ATTRIBUTED_PROVIDER_URL).is_some();
    let Value::Object(element) = stored else {
        return Err(Outcome::error(
            500,
            IssueType::Exception,
            "a stored member found by its entity is not a JSON object",
        ));
    };
    if let Some(period) = added.get("period") {
        element.insert("period".into(), period.clone());
    }
    if element.get("inactive") == Some(&Value::Bool(true)) {
        element.shift_remove("inactive");
    }
    let provider = added
        .get("extension")
        .and_then(Value::as_array)
        .and_then(|list| {
            list.iter()
                .find(|e| is_extension(e, ATTRIBUTED_PROVIDER_URL))
        });
    let Some(provider) = provider.filter(|_| !attributed) else {
        return Ok(());
    };
    match element
        .entry("extension")
        .or_insert_with(|| Value::Array(Vec::new()))
    {
        Value::Array(list) => {
            // A provider extension without a usable reference named nobody.
            list.retain(|e| !is_extension(e, ATTRIBUTED_PROVIDER_URL));
            list.push(provider.clone());
            Ok(())
        }
        _ => Err(Outcome::error(
            422,
            IssueType::Processing,
            "the stored member's extension is not an array, so no attributed provider can be added to it",
        )),
    }
}

fn is_extension(extension: &Value, url: &str) -> bool {
    extension.get("url").and_then(Value::as_str) == Some(url)
}

/// The reference an element's extension `url` points at, as a comparable
/// key: the `reference`, or `identifier:{system}|{value}` (an NPI).
fn extension_reference_key(element: &Value, url: &str) -> Option<String> {
    let value = element
        .get("extension")?
        .as_array()?
        .iter()
        .find(|e| is_extension(e, url))?
        .get("valueReference")?;
    let key = crate::fhir::member_array::reference_key(value);
    (!key.is_empty()).then_some(key)
}

fn not_listed(member: &AtrMember, provider: Option<&str>, coverage: Option<&str>) -> Outcome {
    let mut what = format!("member '{}'", member.match_key);
    if let Some(provider) = provider {
        what.push_str(&format!(" attributed to '{provider}'"));
    }
    if let Some(coverage) = coverage {
        what.push_str(&format!(" with coverage '{coverage}'"));
    }
    Outcome::error(
        422,
        IssueType::NotFound,
        format!("$member-remove: the Group lists no {what}"),
    )
}

fn key_exhausted(e: order_key::KeyError) -> Outcome {
    Outcome::error(
        500,
        IssueType::Exception,
        format!("no order key for a new member: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parameters: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"resourceType": "Parameters", "parameter": parameters})).unwrap()
    }

    fn patient(r: &str) -> Value {
        json!({"name": "patientReference", "valueReference": {"reference": r}})
    }

    fn provider(r: &str) -> Value {
        json!({"name": "providerReference", "valueReference": {"reference": r}})
    }

    fn member_id(value: &str) -> Value {
        json!({"name": "memberId", "valueIdentifier": {"system": "http://payer.example/member", "value": value}})
    }

    fn npi(value: &str) -> Value {
        json!({"name": "providerNpi", "valueIdentifier": {"system": NPI_SYSTEM, "value": value}})
    }

    fn period(start: &str, end: &str) -> Value {
        json!({"name": "attributionPeriod", "valuePeriod": {"start": start, "end": end}})
    }

    fn parse(operation: AtrOperation, parameters: Value) -> Result<AtrMember, Outcome> {
        let mut members = parse_atr_parameters(operation, &body(parameters))?;
        assert_eq!(members.len(), 1);
        Ok(members.remove(0))
    }

    fn refusal(operation: AtrOperation, parameters: Value) -> (u16, IssueType, String) {
        let e = parse(operation, parameters).unwrap_err();
        (e.status, e.issues[0].code, e.first_diagnostics().to_owned())
    }

    fn provider_extension(reference: &str) -> Value {
        json!({"url": ATTRIBUTED_PROVIDER_URL, "valueReference": {"reference": reference}})
    }

    use AtrOperation::{MemberAdd, MemberRemove};

    // -- parsing ------------------------------------------------------------

    #[test]
    fn path_segments_name_the_two_operations() {
        assert_eq!(
            AtrOperation::from_path_segment("$member-add"),
            Some(MemberAdd)
        );
        assert_eq!(
            AtrOperation::from_path_segment("$member-remove"),
            Some(MemberRemove)
        );
        assert_eq!(AtrOperation::from_path_segment("$everything"), None);
    }

    #[test]
    fn patient_and_provider_references_with_a_period_build_an_atr_member() {
        let m = parse(
            MemberAdd,
            json!([
                patient("Patient/1"),
                provider("Practitioner/7"),
                period("2026-01-01", "2026-12-31")
            ]),
        )
        .unwrap();
        assert_eq!(m.match_key, "Patient/1");
        assert_eq!(
            m.element.to_string(),
            json!({
                "entity": {"reference": "Patient/1"},
                "period": {"start": "2026-01-01", "end": "2026-12-31"},
                "extension": [provider_extension("Practitioner/7")]
            })
            .to_string()
        );
    }

    #[test]
    fn member_id_and_npi_build_an_identifier_entity_and_an_npi_provider() {
        let m = parse(MemberAdd, json!([member_id("M-1"), npi("1234567893")])).unwrap();
        assert_eq!(m.match_key, "identifier:http://payer.example/member|M-1");
        assert_eq!(
            m.element.to_string(),
            json!({
                "entity": {"identifier": {"system": "http://payer.example/member", "value": "M-1"}},
                "extension": [{"url": ATTRIBUTED_PROVIDER_URL, "valueReference": {"identifier": {"system": NPI_SYSTEM, "value": "1234567893"}}}]
            })
            .to_string()
        );
        assert_eq!(match_key(&m.element).as_deref(), Some(m.match_key.as_str()));
    }

    #[test]
    fn an_npi_without_a_system_gets_the_npi_system() {
        let m = parse(
            MemberAdd,
            json!([member_id("M-1"), {"name": "providerNpi", "valueIdentifier": {"value": "1234567893"}}, period("2026-01", "2026-06")]),
        )
        .unwrap();
        assert_eq!(
            m.element["extension"][0]["valueReference"]["identifier"]["system"],
            NPI_SYSTEM
        );
        assert_eq!(
            m.element["period"],
            json!({"start": "2026-01", "end": "2026-06"})
        );
    }

    #[test]
    fn a_patient_or_member_id_alone_is_accepted_by_both_operations() {
        for operation in [MemberAdd, MemberRemove] {
            let m = parse(operation, json!([patient("Patient/1")])).unwrap();
            assert_eq!(m.element, json!({"entity": {"reference": "Patient/1"}}));
            let m = parse(operation, json!([member_id("M-1")])).unwrap();
            assert!(m.match_key.starts_with("identifier:"));
        }
    }

    #[test]
    fn member_remove_takes_a_coverage_reference() {
        let m = parse(
            MemberRemove,
            json!([patient("Patient/1"), provider("Organization/2"), {"name": "coverageReference", "valueReference": {"reference": "Coverage/9"}}]),
        )
        .unwrap();
        assert_eq!(
            m.element["extension"][1],
            json!({"url": COVERAGE_REFERENCE_URL, "valueReference": {"reference": "Coverage/9"}})
        );
    }

    #[test]
    fn a_body_that_is_not_json_or_not_parameters_is_a_bad_request() {
        let e = parse_atr_parameters(MemberAdd, b"{").unwrap_err();
        assert_eq!((e.status, e.issues[0].code), (400, IssueType::Invalid));
        let e = parse_atr_parameters(MemberAdd, br#"{"resourceType": "Group"}"#).unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse_atr_parameters(
            MemberAdd,
            br#"{"resourceType": "Parameters", "parameter": {}}"#,
        )
        .unwrap_err();
        assert_eq!((e.status, e.issues[0].code), (400, IssueType::Structure));
        let e = parse_atr_parameters(MemberAdd, &body(json!([{"valueString": "x"}]))).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn no_member_is_refused_as_required() {
        let (status, code, why) = refusal(MemberAdd, json!([]));
        assert_eq!((status, code), (422, IssueType::Required));
        assert!(why.contains("memberId or a patientReference"), "{why}");
        let e =
            parse_atr_parameters(MemberRemove, br#"{"resourceType": "Parameters"}"#).unwrap_err();
        assert_eq!(e.status, 422);
    }

    #[test]
    fn a_provider_without_a_patient_is_refused_naming_the_provider() {
        let (status, code, why) = refusal(MemberAdd, json!([provider("Practitioner/1")]));
        assert_eq!((status, code), (422, IssueType::Required));
        assert!(why.contains("providerReference"), "{why}");
        let (_, _, why) = refusal(MemberRemove, json!([npi("1234567893")]));
        assert!(why.contains("providerNpi"), "{why}");
    }

    #[test]
    fn both_member_id_and_patient_reference_are_refused() {
        let (status, code, why) = refusal(MemberAdd, json!([member_id("M"), patient("Patient/1")]));
        assert_eq!((status, code), (422, IssueType::Invalid));
        assert!(why.contains("memberId and patientReference"), "{why}");
    }

    #[test]
    fn both_provider_forms_are_refused() {
        let (status, _, why) = refusal(
            MemberAdd,
            json!([
                patient("Patient/1"),
                npi("1234567893"),
                provider("Practitioner/1")
            ]),
        );
        assert_eq!(status, 422);
        assert!(why.contains("providerNpi and providerReference"), "{why}");
    }

    #[test]
    fn a_repeated_parameter_is_refused_naming_it() {
        let e = parse(
            MemberAdd,
            json!([patient("Patient/1"), patient("Patient/2")]),
        )
        .unwrap_err();
        assert_eq!(e.status, 422);
        assert!(e.first_diagnostics().contains("patientReference"));
        assert_eq!(e.issues[0].expression, ["Parameters.parameter[1]"]);
    }

    #[test]
    fn unknown_parameters_are_refused_naming_them() {
        let (status, code, why) = refusal(
            MemberAdd,
            json!([patient("Patient/1"), {"name": "foo", "valueString": "x"}]),
        );
        assert_eq!((status, code), (422, IssueType::NotSupported));
        assert!(why.contains("'foo'"), "{why}");
        // The IG's member-add has no coverage parameter, member-remove no period.
        let (status, _, why) = refusal(
            MemberAdd,
            json!([patient("Patient/1"), {"name": "coverageReference", "valueReference": {"reference": "Coverage/1"}}]),
        );
        assert_eq!(status, 422);
        assert!(why.contains("coverageReference"), "{why}");
        let (status, code, why) = refusal(
            MemberRemove,
            json!([patient("Patient/1"), period("2026-01-01", "2026-02-01")]),
        );
        assert_eq!((status, code), (422, IssueType::NotSupported));
        assert!(why.contains("attributionPeriod"), "{why}");
    }

    #[test]
    fn malformed_values_are_refused_naming_the_parameter() {
        let cases = [
            (
                json!([{"name": "patientReference", "valueString": "Patient/1"}]),
                "patientReference",
            ),
            (
                json!([{"name": "patientReference", "valueReference": {"identifier": {"value": "1"}}}]),
                "patientReference",
            ),
            (json!([patient("bad ref")]), "patientReference"),
            (json!([patient("Practitioner/1")]), "patientReference"),
            (
                json!([patient("Patient/1"), provider("Patient/2")]),
                "providerReference",
            ),
            (
                json!([{"name": "memberId", "valueIdentifier": {"value": "M-1"}}]),
                "memberId",
            ),
            (
                json!([{"name": "memberId", "valueIdentifier": {"system": "a|b", "value": "M-1"}}]),
                "memberId",
            ),
            (json!([member_id("M"), npi("12345")]), "providerNpi"),
            (
                json!([member_id("M"), {"name": "providerNpi", "valueIdentifier": {"system": "urn:x", "value": "1234567893"}}]),
                "providerNpi",
            ),
            (
                json!([patient("Patient/1"), period("2026-13-01", "2027-01-01")]),
                "attributionPeriod",
            ),
            (
                json!([patient("Patient/1"), period("2026-12-31", "2026-01-01")]),
                "attributionPeriod",
            ),
            (
                json!([
                    patient("Patient/1"),
                    period("2026-01-01T10:00:00", "2027-01-01")
                ]),
                "attributionPeriod",
            ),
            (
                json!([patient("Patient/1"), {"name": "attributionPeriod", "valuePeriod": {}}]),
                "attributionPeriod",
            ),
            (
                json!([patient("Patient/1"), {"name": "attributionPeriod", "valuePeriod": {"start": 2026}}]),
                "attributionPeriod",
            ),
        ];
        for (parameters, name) in cases {
            let (status, _, why) = refusal(MemberAdd, parameters.clone());
            assert_eq!(status, 422, "{parameters}");
            assert!(why.contains(name), "{parameters}: {why}");
        }
    }

    #[test]
    fn full_date_times_with_zones_are_accepted_as_period_bounds() {
        let m = parse(
            MemberAdd,
            json!([
                patient("Patient/1"),
                period("2026-01-01T00:00:00Z", "2026-12-31T23:59:59.999+05:30")
            ]),
        )
        .unwrap();
        assert_eq!(m.element["period"]["start"], "2026-01-01T00:00:00Z");
        assert!(is_date_time("2026"));
        assert!(!is_date_time("26-01-01"));
        assert!(!is_date_time("2026-01-01T00:00:00+5:30"));
    }

    #[test]
    fn the_attribution_list_status_is_read_from_the_group() {
        let group = json!({"resourceType": "Group", "extension": [
            {"url": "x", "valueCode": "y"},
            {"url": ATTRIBUTION_LIST_STATUS_URL, "valueCode": "draft"}
        ]});
        assert_eq!(attribution_list_status(&group), Some("draft"));
        assert_eq!(attribution_list_status(&json!({})), None);
    }

    // -- planning -----------------------------------------------------------

    fn slot(id: &str, key: &str, element: Value) -> Slot {
        Slot {
            id: id.into(),
            key: key.into(),
            element,
        }
    }

    fn counter() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("new{n}")
        }
    }

    fn plan(
        operation: AtrOperation,
        parameters: Value,
        stored: Vec<Slot>,
        len: usize,
        floor: &str,
    ) -> Result<Plan, Outcome> {
        let members = parse_atr_parameters(operation, &body(parameters))?;
        let mut found = HashMap::new();
        for m in &members {
            let slots = stored
                .iter()
                .filter(|s| match_key(&s.element).as_deref() == Some(m.match_key.as_str()))
                .cloned()
                .collect::<Vec<_>>();
            found.insert(m.match_key.clone(), slots);
        }
        atr_plan(operation, &members, &found, len, floor, &mut counter())
    }

    fn put(event: &SlotEvent) -> (&str, &str, Option<&Value>, &Value) {
        match event {
            SlotEvent::Put {
                id,
                key,
                before,
                after,
            } => (id, key, before.as_ref(), after),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn adding_a_new_member_appends_it_above_the_floor() {
        let p = plan(
            MemberAdd,
            json!([
                patient("Patient/9"),
                provider("Practitioner/7"),
                period("2026-01-01", "2026-12-31")
            ]),
            vec![slot(
                "s1",
                "a0",
                json!({"entity": {"reference": "Patient/1"}}),
            )],
            1,
            "a3",
        )
        .unwrap();
        let [event] = p.events.as_slice() else {
            panic!("{:?}", p.events)
        };
        let (id, key, before, after) = put(event);
        assert_eq!((id, key, before), ("new1", "a4", None));
        assert_eq!(after["extension"][0], provider_extension("Practitioner/7"));
        assert_eq!(
            (p.len, p.present, p.floor.as_deref()),
            (2, true, Some("a4"))
        );
    }

    #[test]
    fn adding_to_an_empty_group_starts_at_the_first_key() {
        let p = plan(MemberAdd, json!([member_id("M-1")]), vec![], 0, "").unwrap();
        assert_eq!(put(&p.events[0]).1, order_key::FIRST);
        assert_eq!(p.len, 1);
    }

    #[test]
    fn re_adding_an_inactive_member_reactivates_it_in_place_keeping_other_fields() {
        let stored = json!({
            "zz": 1,
            "entity": {"reference": "Patient/1", "display": "Ann"},
            "period": {"start": "2025-01-01"},
            "inactive": true,
            "extension": [{"url": "other", "valueString": "kept"}, provider_extension("Practitioner/7")]
        });
        let p = plan(
            MemberAdd,
            json!([
                patient("Patient/1"),
                provider("Practitioner/7"),
                period("2026-01-01", "2026-12-31")
            ]),
            vec![slot("s1", "a0", stored.clone())],
            1,
            "a0",
        )
        .unwrap();
        let [event] = p.events.as_slice() else {
            panic!("{:?}", p.events)
        };
        let (id, key, before, after) = put(event);
        assert_eq!((id, key, before), ("s1", "a0", Some(&stored)));
        let want = json!({
            "zz": 1,
            "entity": {"reference": "Patient/1", "display": "Ann"},
            "period": {"start": "2026-01-01", "end": "2026-12-31"},
            "extension": [{"url": "other", "valueString": "kept"}, provider_extension("Practitioner/7")]
        });
        assert_eq!(after.to_string(), want.to_string());
        assert_eq!((p.len, p.floor), (1, None));
    }

    #[test]
    fn re_adding_an_active_member_with_nothing_new_writes_no_event() {
        let stored = json!({"entity": {"reference": "Patient/1"}, "inactive": false, "period": {"start": "2026-01-01"}});
        let p = plan(
            MemberAdd,
            json!([patient("Patient/1")]),
            vec![slot("s1", "a0", stored)],
            1,
            "a0",
        )
        .unwrap();
        assert!(p.events.is_empty());
        assert_eq!((p.len, p.present, p.floor), (1, true, None));
    }

    #[test]
    fn adding_a_provider_to_an_unattributed_entry_attributes_it() {
        let stored = json!({"entity": {"reference": "Patient/1"}});
        let p = plan(
            MemberAdd,
            json!([patient("Patient/1"), provider("Organization/3")]),
            vec![slot("s1", "a0", stored)],
            1,
            "a0",
        )
        .unwrap();
        let (id, _, _, after) = put(&p.events[0]);
        assert_eq!(id, "s1");
        assert_eq!(
            after["extension"],
            json!([provider_extension("Organization/3")])
        );
    }

    #[test]
    fn adding_a_second_provider_lists_the_member_again() {
        // The IG lists a member once per attributed provider.
        let stored = json!({"entity": {"reference": "Patient/1"}, "extension": [provider_extension("Practitioner/7")]});
        let p = plan(
            MemberAdd,
            json!([patient("Patient/1"), provider("Practitioner/8")]),
            vec![slot("s1", "a0", stored)],
            1,
            "a0",
        )
        .unwrap();
        let [event] = p.events.as_slice() else {
            panic!("{:?}", p.events)
        };
        let (id, key, before, after) = put(event);
        assert_eq!((id, key, before), ("new1", "a1", None));
        assert_eq!(
            after["extension"],
            json!([provider_extension("Practitioner/8")])
        );
        assert_eq!(p.len, 2);
    }

    #[test]
    fn an_npi_provider_matches_a_stored_npi_attribution() {
        let stored = json!({
            "entity": {"identifier": {"system": "http://payer.example/member", "value": "M-1"}},
            "inactive": true,
            "extension": [{"url": ATTRIBUTED_PROVIDER_URL, "valueReference": {"identifier": {"system": NPI_SYSTEM, "value": "1234567893"}, "display": "Dr X"}}]
        });
        let p = plan(
            MemberAdd,
            json!([member_id("M-1"), npi("1234567893")]),
            vec![slot("s1", "a0", stored)],
            1,
            "a0",
        )
        .unwrap();
        let (id, _, _, after) = put(&p.events[0]);
        assert_eq!(id, "s1");
        assert!(after.get("inactive").is_none());
        // The stored attribution is the same provider: kept with its display.
        assert_eq!(after["extension"][0]["valueReference"]["display"], "Dr X");
    }

    #[test]
    fn an_add_without_a_provider_updates_every_entry_of_the_member() {
        let a = json!({"entity": {"reference": "Patient/1"}, "inactive": true, "extension": [provider_extension("Practitioner/7")]});
        let b = json!({"entity": {"reference": "Patient/1"}, "inactive": true, "extension": [provider_extension("Practitioner/8")]});
        let p = plan(
            MemberAdd,
            json!([patient("Patient/1")]),
            vec![slot("s1", "a0", a), slot("s2", "a1", b)],
            2,
            "a1",
        )
        .unwrap();
        let ids: Vec<&str> = p.events.iter().map(|e| put(e).0).collect();
        assert_eq!(ids, ["s1", "s2"]);
        assert!(p.events.iter().all(|e| put(e).3.get("inactive").is_none()));
    }

    #[test]
    fn removing_a_member_marks_it_inactive_keeping_its_place() {
        let stored = json!({"entity": {"reference": "Patient/1"}, "inactive": false, "period": {"start": "2026-01-01"}});
        let p = plan(
            MemberRemove,
            json!([patient("Patient/1")]),
            vec![slot("s1", "a0", stored.clone())],
            1,
            "a0",
        )
        .unwrap();
        let [event] = p.events.as_slice() else {
            panic!("{:?}", p.events)
        };
        let (id, key, before, after) = put(event);
        assert_eq!((id, key, before), ("s1", "a0", Some(&stored)));
        assert_eq!(
            after.to_string(),
            json!({"entity": {"reference": "Patient/1"}, "inactive": true, "period": {"start": "2026-01-01"}}).to_string()
        );
        assert_eq!((p.len, p.present, p.floor), (1, true, None));
    }

    #[test]
    fn removing_an_already_inactive_member_writes_no_event() {
        let stored = json!({"entity": {"reference": "Patient/1"}, "inactive": true});
        let p = plan(
            MemberRemove,
            json!([patient("Patient/1")]),
            vec![slot("s1", "a0", stored)],
            1,
            "a0",
        )
        .unwrap();
        assert!(p.events.is_empty());
    }

    #[test]
    fn removing_with_a_provider_marks_only_that_attribution() {
        let a = json!({"entity": {"reference": "Patient/1"}, "extension": [provider_extension("Practitioner/7")]});
        let b = json!({"entity": {"reference": "Patient/1"}, "extension": [provider_extension("Practitioner/8")]});
        let p = plan(
            MemberRemove,
            json!([patient("Patient/1"), provider("Practitioner/8")]),
            vec![slot("s1", "a0", a.clone()), slot("s2", "a1", b)],
            2,
            "a1",
        )
        .unwrap();
        let [event] = p.events.as_slice() else {
            panic!("{:?}", p.events)
        };
        assert_eq!(put(event).0, "s2");
        // Without a provider: every attribution of the member.
        let p = plan(
            MemberRemove,
            json!([patient("Patient/1")]),
            vec![slot("s1", "a0", a.clone()), slot("s2", "a1", a)],
            2,
            "a1",
        )
        .unwrap();
        assert_eq!(p.events.len(), 2);
    }

    #[test]
    fn removing_with_a_coverage_marks_only_the_entry_of_that_coverage() {
        let entry = |coverage: &str| {
            json!({"entity": {"reference": "Patient/1"}, "extension": [
                provider_extension("Organization/2"),
                {"url": COVERAGE_REFERENCE_URL, "valueReference": {"reference": coverage}}
            ]})
        };
        let p = plan(
            MemberRemove,
            json!([patient("Patient/1"), provider("Organization/2"), {"name": "coverageReference", "valueReference": {"reference": "Coverage/2"}}]),
            vec![slot("s1", "a0", entry("Coverage/1")), slot("s2", "a1", entry("Coverage/2"))],
            2,
            "a1",
        )
        .unwrap();
        let [event] = p.events.as_slice() else {
            panic!("{:?}", p.events)
        };
        assert_eq!(put(event).0, "s2");
    }

    #[test]
    fn removing_a_member_the_group_does_not_list_is_refused_naming_it() {
        let e = plan(MemberRemove, json!([member_id("M-404")]), vec![], 0, "").unwrap_err();
        assert_eq!((e.status, e.issues[0].code), (422, IssueType::NotFound));
        assert!(
            e.first_diagnostics().contains("M-404"),
            "{}",
            e.first_diagnostics()
        );
        let stored = json!({"entity": {"reference": "Patient/1"}, "extension": [provider_extension("Practitioner/7")]});
        let e = plan(
            MemberRemove,
            json!([patient("Patient/1"), provider("Practitioner/8")]),
            vec![slot("s1", "a0", stored)],
            1,
            "a0",
        )
        .unwrap_err();
        assert_eq!(e.status, 422);
        assert!(
            e.first_diagnostics().contains("Practitioner/8"),
            "{}",
            e.first_diagnostics()
        );
    }

    #[test]
    fn a_member_the_store_was_not_asked_about_is_an_internal_error() {
        let members =
            parse_atr_parameters(MemberAdd, &body(json!([patient("Patient/1")]))).unwrap();
        let e = atr_plan(MemberAdd, &members, &HashMap::new(), 0, "", &mut counter()).unwrap_err();
        assert_eq!(e.status, 500);
    }

    #[test]
    fn several_new_members_get_ascending_keys_and_one_add_twice_makes_one_entry() {
        let members = [
            AtrMember {
                match_key: "Patient/1".into(),
                element: json!({"entity": {"reference": "Patient/1"}}),
            },
            AtrMember {
                match_key: "Patient/2".into(),
                element: json!({"entity": {"reference": "Patient/2"}}),
            },
            AtrMember {
                match_key: "Patient/1".into(),
                element: json!({"entity": {"reference": "Patient/1"}, "period": {"start": "2026-01-01"}}),
            },
        ];
        let found: HashMap<String, Vec<Slot>> = [
            ("Patient/1".to_owned(), vec![]),
            ("Patient/2".to_owned(), vec![]),
        ]
        .into();
        let p = atr_plan(MemberAdd, &members, &found, 5, "a4", &mut counter()).unwrap();
        let keys: Vec<&str> = p.events.iter().map(|e| put(e).1).collect();
        assert_eq!(keys, ["a5", "a6"]);
        assert_eq!(put(&p.events[0]).3["period"]["start"], "2026-01-01");
        assert_eq!((p.len, p.floor.as_deref()), (7, Some("a6")));
    }

    #[test]
    fn an_identifier_entity_and_a_reference_entity_have_different_match_keys() {
        assert_eq!(
            match_key(&json!({"entity": {"reference": "Patient/1", "identifier": {"system": "s", "value": "v"}}})).as_deref(),
            Some("Patient/1")
        );
        assert_eq!(
            match_key(&json!({"entity": {"identifier": {"system": "s", "value": "v"}}})).as_deref(),
            Some("identifier:s|v")
        );
        assert_eq!(
            match_key(&json!({"entity": {"identifier": {"value": "v"}}})),
            None
        );
        assert_eq!(match_key(&json!({"inactive": true})), None);
    }
}
