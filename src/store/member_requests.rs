//! The client request ids the proxy remembers per Group
//! (`Group_4_0_0_MemberRequests`): which request an `X-Request-Id` named, so
//! a retry is replayed and a reuse for another request is refused.

use mongodb::bson::{doc, DateTime};

use super::group_documents::GroupDocuments;
use super::mongo::DocumentStoreError;

impl GroupDocuments {
    /// Remembers that the client's `client_id` on this Group names the request
    /// with `digest` (the last attempt wins: only a committed one is replayed).
    pub async fn record_request(
        &self,
        group_key: &str,
        client_id: &str,
        digest: &str,
    ) -> Result<(), DocumentStoreError> {
        self.requests
            .update_one(
                doc! { "_id": request_key(group_key, client_id) },
                doc! { "$set": { "digest": digest, "at": DateTime::now() } },
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    /// The digest of the request `client_id` names on this Group, if recorded.
    pub async fn request_digest(
        &self,
        group_key: &str,
        client_id: &str,
    ) -> Result<Option<String>, DocumentStoreError> {
        let found = self
            .requests
            .find_one(doc! { "_id": request_key(group_key, client_id) })
            .await?;
        Ok(found.and_then(|d| d.get_str("digest").ok().map(str::to_string)))
    }
}

/// Client request ids are visible ASCII, so a newline cannot occur in one.
fn request_key(group_key: &str, client_id: &str) -> String {
    format!("{group_key}\n{client_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_key_keeps_apart_the_same_id_on_two_groups() {
        assert_ne!(request_key("g1", "r"), request_key("g2", "r"));
        assert_ne!(request_key("g1", "r"), request_key("g", "1r"));
    }
}
