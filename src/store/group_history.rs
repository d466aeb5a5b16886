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

    /// A history entry as the legacy server writes one: a Bundle entry.
    pub async fn insert_history(
        &self,
        resource: &Document,
        request_id: &str,
        method: &str,
        url: &str,
        patch_ops: &[serde_json::Value],
    ) -> Result<(), DocumentStoreError> {
        // The reference server's own shape: the entry's id is the Group's
        // `_uuid` (the FHIR id where there is none); a patch's response
        // carries an informational issue per op, the op as JSON text.
        let entry_id = resource
            .get_str("_uuid")
            .or_else(|_| resource.get_str("id"))
            .unwrap_or_default()
            .to_string();
        let mut fhir = resource.clone();
        fhir.remove("_id");
        fhir.remove("_memberCommitToken");
        let entry = doc! {
            "id": entry_id,
            "resource": fhir,
            "request": { "id": request_id, "method": method, "url": url },
            "response": history_response(patch_ops),
        };
        self.history.insert_one(entry).await?;
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
}
