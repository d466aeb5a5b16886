//! A Group created with members (`POST {base}/Group`, or a `PUT` to an id
//! the legacy server does not have yet) is created by the legacy server from
//! the client's request, forwarded unchanged: exactly what the legacy server
//! would do without the proxy, members inline. Then, before the client hears
//! of the new Group, the proxy adopts it: when the new document is in this
//! MongoDB, its inline members move to the member store at the version the
//! legacy server gave it (the migration of one Group, see [`super::migrate`]).
//!
//! So nothing is stripped before the proxy knows where the legacy server
//! stores Groups: an upstream whose Groups are not in this MongoDB keeps its
//! Groups whole, and a Group the proxy cannot adopt (a member it cannot store,
//! a store down) simply stays on the legacy path, as if created directly.

use crate::fhir::migration::GroupOutcome;
use crate::group::migrate::MigrateOptions;
use crate::group::write::UpstreamReply;

use super::GroupService;

/// What became of a Group the legacy server created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// Its members now live in the member store.
    Adopted { members: u64 },
    /// Created without members: it moves at its first member write.
    NoMembers,
    /// Not in this MongoDB: the upstream keeps its Groups elsewhere.
    NotInMongo,
    /// Left on the legacy path, and why.
    Left(String),
}

impl GroupService {
    /// Adopts Group `id`, just created by the legacy server (see the module doc).
    pub async fn adopt_created(&self, id: &str) -> Adoption {
        match self.documents.head(id).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                self.note_upstream_groups_elsewhere(id);
                return Adoption::NotInMongo;
            }
            Err(error) => return Adoption::Left(error.to_string()),
        }
        match self
            .migrate_group(id, &MigrateOptions::default(), &mut |_| {})
            .await
        {
            GroupOutcome::Moved { members } => Adoption::Adopted { members },
            GroupOutcome::Skipped(_) => Adoption::NoMembers,
            GroupOutcome::Failed(why) => Adoption::Left(why),
        }
    }
}

/// The id in a created Group's `Location` (`.../Group/{id}/_history/{vid}`,
/// `.../Group/{id}`, or the reference server's relative `4_0_0/Group/{id}`).
pub fn id_in_location(location: &str) -> Option<String> {
    let path = location.split(['?', '#']).next()?;
    let after = path.rsplit_once("Group/")?.1;
    let id = after.split('/').next()?;
    crate::fhir::reference::is_fhir_id(id).then(|| id.to_string())
}

/// The id of a Group the legacy server created: from `Location`, else the
/// body's `id`.
pub fn created_id(reply: &UpstreamReply) -> Option<String> {
    let from_location = reply
        .headers
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(id_in_location);
    from_location.or_else(|| {
        let body: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
        let id = body.get("id")?.as_str()?;
        crate::fhir::reference::is_fhir_id(id).then(|| id.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(location: Option<&str>, body: &str) -> UpstreamReply {
        let mut headers = http::HeaderMap::new();
        if let Some(location) = location {
            headers.insert(http::header::LOCATION, location.parse().unwrap());
        }
        UpstreamReply {
            status: 201,
            headers,
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn the_created_id_comes_from_location_or_the_body() {
        let cases = [
            (Some("http://h/4_0_0/Group/abc/_history/1"), "", Some("abc")),
            (Some("/4_0_0/Group/abc"), "", Some("abc")),
            (Some("4_0_0/Group/abc"), "", Some("abc")),
            (None, r#"{"resourceType":"Group","id":"b-2"}"#, Some("b-2")),
            (Some("http://h/elsewhere"), r#"{"id":"c"}"#, Some("c")),
            (None, "", None),
            (None, r#"{"id":"bad id!"}"#, None),
        ];
        for (location, body, expected) in cases {
            assert_eq!(
                created_id(&reply(location, body)).as_deref(),
                expected,
                "{location:?} {body}"
            );
        }
    }
}
