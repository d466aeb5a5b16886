//! The legacy server's history of Group versions (`Group_4_0_0_History`, in
//! the history database): the entries the proxy writes for the versions it
//! commits, in the reference server's shape, and the lookups recovery needs.

use mongodb::bson::{doc, Bson, Document};

use super::group_documents::GroupDocuments;
use super::mongo::DocumentStoreError;

impl GroupDocuments {
    /// The resource of the history entry of version `version` of Group `id`.
    pub async fn history_resource(
        &self,
        id: &str,
        version: u64,
    ) -> Result<Option<Document>, DocumentStoreError> {
        let found = self
            .history
            .find_one(doc! { "resource.id": id, "resource.meta.versionId": version.to_string() })
            .projection(doc! { "resource": 1 })
            .await?;
        Ok(found.and_then(|entry| entry.get_document("resource").ok().cloned()))
    }

    /// The `request.id` of the history entry of version `version` of Group
    /// `id`: `None` when there is no entry.
    pub async fn history_request_id(
        &self,
        id: &str,
        version: u64,
    ) -> Result<Option<String>, DocumentStoreError> {
        let found = self
            .history
            .find_one(doc! { "resource.id": id, "resource.meta.versionId": version.to_string() })
            .projection(doc! { "request.id": 1 })
            .await?;
        Ok(found.map(|entry| {
            entry
                .get_document("request")
                .and_then(|r| r.get_str("id"))
                .unwrap_or_default()
                .to_string()
        }))
    }

    /// The history entries of one write, one per version it made, in one
    /// insert: a batch of member patches costs one history command, not one
    /// per patch. Entries are written in version order.
    pub async fn insert_history(
        &self,
        entries: Vec<HistoryEntry<'_>>,
    ) -> Result<(), DocumentStoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let documents: Vec<Document> = entries.iter().map(HistoryEntry::to_document).collect();
        self.history.insert_many(documents).await?;
        Ok(())
    }
    /// The history entry of `version` (written by the legacy server for the
    /// proxy's PUT of a split patch) as the client's PATCH: its method, and
    /// the outcome listing every op of the patch.
    /// `false` when the entry is not there (yet).
    pub async fn record_patch_in_history(
        &self,
        id: &str,
        version: u64,
        patch_ops: &[serde_json::Value],
    ) -> Result<bool, DocumentStoreError> {
        let updated = self
            .history
            .update_one(
                doc! { "resource.id": id, "resource.meta.versionId": version.to_string() },
                doc! { "$set": {
                    "request.method": "PATCH",
                    "response": history_response(patch_ops),
                } },
            )
            .await?;
        Ok(updated.matched_count > 0)
    }

    /// Whether the history holds an entry for version `version` of Group `id`.
    pub async fn has_history(&self, id: &str, version: u64) -> Result<bool, DocumentStoreError> {
        let found = self
            .history
            .find_one(doc! { "resource.id": id, "resource.meta.versionId": version.to_string() })
            .projection(doc! { "_id": 1 })
            .await?;
        Ok(found.is_some())
    }
}

/// One history entry as the legacy server writes one: a Bundle entry of
/// the Group at a version and the request that made it.
pub struct HistoryEntry<'a> {
    /// The Group document at the entry's version.
    pub resource: &'a Document,
    pub request_id: &'a str,
    pub method: &'a str,
    pub url: &'a str,
    /// The client's JSON Patch ops (empty: the entry names no outcome).
    pub patch_ops: &'a [serde_json::Value],
}

impl HistoryEntry<'_> {
    fn to_document(&self) -> Document {
        // The reference server's own shape: the entry's id is the Group's
        // `_uuid` (the FHIR id where there is none); a patch's response
        // carries an informational issue per op, the op as JSON text.
        let entry_id = self
            .resource
            .get_str("_uuid")
            .or_else(|_| self.resource.get_str("id"))
            .unwrap_or_default()
            .to_string();
        let mut fhir = self.resource.clone();
        fhir.remove("_id");
        fhir.remove("_memberCommitToken");
        doc! {
            "id": entry_id,
            "resource": fhir,
            "request": { "id": self.request_id, "method": self.method, "url": self.url },
            "response": history_response(self.patch_ops),
        }
    }
}

/// The `response` of a history entry: the status, and for a patch the
/// reference server's outcome listing the ops it applied.
fn history_response(patch_ops: &[serde_json::Value]) -> Document {
    if patch_ops.is_empty() {
        return doc! { "status": "200" };
    }
    let issues: Vec<Bson> = patch_ops
        .iter()
        .map(|op| {
            Bson::Document(doc! {
                "severity": "information",
                "code": "informational",
                "diagnostics": op.to_string(),
            })
        })
        .collect();
    doc! {
        "status": "200",
        "outcome": { "resourceType": "OperationOutcome", "issue": issues },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_entry_without_patch_ops_says_only_its_status() {
        assert_eq!(history_response(&[]), doc! { "status": "200" });
    }

    #[test]
    fn a_patch_history_entry_lists_every_op_as_an_informational_issue() {
        let ops = [
            serde_json::json!({"op": "add", "path": "/member/-", "value": {}}),
            serde_json::json!({"op": "remove", "path": "/member/0"}),
        ];
        let response = history_response(&ops);
        let issues = response
            .get_document("outcome")
            .and_then(|o| o.get_array("issue"))
            .unwrap();
        assert_eq!(issues.len(), 2);
        let first = issues[0].as_document().unwrap();
        assert_eq!(first.get_str("code").unwrap(), "informational");
        assert_eq!(first.get_str("diagnostics").unwrap(), ops[0].to_string());
    }
    #[test]
    fn a_history_entry_is_keyed_by_uuid_and_drops_the_internal_fields() {
        let resource = doc! {
            "_id": "x", "id": "g1", "_uuid": "u-1", "_memberCommitToken": "t",
            "meta": { "versionId": "3" },
        };
        let entry = HistoryEntry {
            resource: &resource,
            request_id: "r-1",
            method: "PATCH",
            url: "/4_0_0/Group/g1",
            patch_ops: &[],
        }
        .to_document();
        assert_eq!(entry.get_str("id").unwrap(), "u-1");
        let stored = entry.get_document("resource").unwrap();
        assert!(!stored.contains_key("_id") && !stored.contains_key("_memberCommitToken"));
        assert_eq!(stored.get_str("id").unwrap(), "g1");
        assert_eq!(
            entry.get_document("request").unwrap(),
            &doc! { "id": "r-1", "method": "PATCH", "url": "/4_0_0/Group/g1" }
        );
    }
}
