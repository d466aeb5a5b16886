//! The legacy server's Group documents in MongoDB, and the proxy's own small
//! per-group state beside them.
//!
//! The Group document (`Group_4_0_0`) is the FHIR JSON plus `_uuid` etc.; the
//! proxy only ever changes `meta.versionId` (a string), `meta.lastUpdated` (a
//! BSON date) and its own `_member*` marks, each time with one conditional update.
//!
//! The proxy's state lives in its own collections, so a legacy server that
//! rewrites whole Group documents cannot drop it. `Group_4_0_0_MemberLocks`
//! holds the one write in flight per Group and what recovery needs to finish
//! it (see `store::member_locks`); `Group_4_0_0_MemberState` holds:
//! - `storage: "clickhouse"` once a Group's members live in ClickHouse, and
//!   the generation of its member key;
//! - `pending`: only from releases before the write record moved into the
//!   lock: a write whose commit may have happened but whose events may not
//!   be published yet, still finished by `group::recovery`.
//!
//! The history entries the proxy writes are in `group_history`, the client
//! request ids it remembers in `member_requests`.
//!
//! The commit also marks the Group document (`_memberStorage`,
//! `_memberGeneration`, `_memberCommitToken`): for people and tools reading
//! MongoDB, and so a write can tell, from the head it reads anyway, that the
//! member state it read before taking the lock still holds.

use mongodb::bson::raw::ValueAccessErrorKind;
use mongodb::bson::{doc, Bson, DateTime, Document, RawArray, RawArrayBuf, RawDocumentBuf};
use mongodb::options::ReturnDocument;
use mongodb::Collection;

use super::member_locks::MemberLocks;
use super::mongo::ids_where;
pub use super::mongo::{DocumentStoreError, LeaseHolder};

pub const GROUP_COLLECTION: &str = "Group_4_0_0";
pub const GROUP_HISTORY_COLLECTION: &str = "Group_4_0_0_History";
pub const MEMBER_STATE_COLLECTION: &str = "Group_4_0_0_MemberState";
pub use super::member_locks::MEMBER_LOCK_COLLECTION;
pub const MEMBER_REQUEST_COLLECTION: &str = "Group_4_0_0_MemberRequests";

pub const STORAGE_CLICKHOUSE: &str = "clickhouse";

/// What a member write needs to know of a Group document.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupHead {
    pub id: String,
    /// Stable, tenant-safe identity (`_uuid`, plus the generation once the
    /// Group was deleted and created again): the key of its member events.
    pub group_key: String,
    pub version: u64,
    pub last_updated: Option<DateTime>,
    pub commit_token: Option<String>,
    /// `_sourceAssigningAuthority`, kept by legacy servers of the reference
    /// server's kind: their stored references carry internal fields
    /// derived from it, and so must the members the proxy stores.
    pub authority: Option<String>,
    /// The document's own marks of a member write's commit
    /// (`_memberStorage`, `_memberGeneration`), both present: set by every
    /// member commit under the Group's lock (a migration sets only
    /// `_memberStorage`), dropped by a reverse migration, absent on a Group
    /// created again. When they match the member state read before the lock
    /// was taken, that state still holds.
    pub marks: Option<CommitMarks>,
}

/// See [`GroupHead::marks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitMarks {
    pub generation: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PendingWrite {
    pub token: String,
    /// The version the write commits (the last one, for a batch).
    pub version: u64,
    /// The first version the write commits: a batch of patches commits
    /// `from_version..=version`, one history entry each.
    pub from_version: u64,
    /// The request URL its history entries record.
    pub url: String,
    pub request_id: String,
    /// The `meta.lastUpdated` its commit writes.
    pub committed_at: Option<DateTime>,
    /// For split patches: the upstream already committed the version that
    /// carries this write's other ops, so the write counts as committed.
    pub upstream_committed: bool,
    /// The writer saw its commit point pass (then could not publish): the
    /// write counts as committed whatever later writes do to the document.
    pub committed: bool,
}

/// See [`GroupDocuments::write_facts`].
#[derive(Debug, Clone)]
pub struct WriteFacts {
    pub state: MemberState,
    /// The head, and whether the document holds members inline; `None`:
    /// no such Group in this MongoDB.
    pub head: Option<(GroupHead, bool)>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct MemberState {
    pub in_clickhouse: bool,
    pub pending: Option<PendingWrite>,
    /// A migration marked the Group migrated at this version and had not yet
    /// removed its inline array (verified equal to the roster): at that
    /// version the array is a copy, not drift.
    pub inline_copy_at: Option<u64>,
    /// Earlier generations of a Group deleted and created again with this
    /// id: their member keys, oldest first, with the time of their delete.
    pub past: Vec<PastGeneration>,
    /// How many times a migrated Group with this id was deleted (part of
    /// its member key).
    pub generation: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PastGeneration {
    pub key: String,
    pub deleted_at: DateTime,
}

impl MemberState {
    /// Whether an inline array seen at `version` is drift: members written
    /// around the proxy into a Group whose roster it keeps.
    pub fn inline_array_is_drift(&self, version: u64) -> bool {
        self.in_clickhouse && self.inline_copy_at != Some(version)
    }
}

#[derive(Clone)]
pub struct GroupDocuments {
    locks: MemberLocks,
    database: mongodb::Database,
    groups: Collection<Document>,
    /// Its methods are in `group_history`.
    pub(super) history: Collection<Document>,
    states: Collection<Document>,
    /// Its methods are in `member_requests`.
    pub(super) requests: Collection<Document>,
}

impl GroupDocuments {
    /// `history`: the database the legacy server keeps history in (often
    /// `database` itself).
    pub fn new(
        database: &mongodb::Database,
        history: &mongodb::Database,
        holder: LeaseHolder,
    ) -> Self {
        Self {
            locks: MemberLocks::new(database, holder),
            database: database.clone(),
            groups: database.collection(GROUP_COLLECTION),
            history: history.collection(GROUP_HISTORY_COLLECTION),
            states: database.collection(MEMBER_STATE_COLLECTION),
            requests: database.collection(MEMBER_REQUEST_COLLECTION),
        }
    }

    /// The per-Group write locks (see [`super::member_locks`]).
    pub fn locks(&self) -> &MemberLocks {
        &self.locks
    }

    /// Records that Group `id`'s members live in ClickHouse (after its first
    /// member write commits).
    pub async fn mark_stored_in_clickhouse(&self, id: &str) -> Result<(), DocumentStoreError> {
        self.states
            .update_one(
                doc! { "_id": id },
                doc! { "$set": { "storage": STORAGE_CLICKHOUSE } },
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    /// Whether MongoDB answers (for readiness probes).
    pub async fn ping(&self) -> Result<(), DocumentStoreError> {
        Ok(crate::store::mongo::ping(&self.database).await?)
    }

    /// The head of Group `id`, without its member array.
    pub async fn head(&self, id: &str) -> Result<Option<GroupHead>, DocumentStoreError> {
        let generation = self.member_state(id).await?.generation;
        self.head_of_generation(id, generation).await
    }

    /// What a write attempt reads of Group `id` before planning: the
    /// proxy's state, the Group's head and whether its document holds
    /// members inline. Two reads: the head's member key comes from the
    /// state's generation, and for a Group whose roster is kept here the
    /// inline array (normally absent, else drift) comes with the head
    /// instead of from a count of its own.
    pub async fn write_facts(&self, id: &str) -> Result<WriteFacts, DocumentStoreError> {
        let state = self.member_state(id).await?;
        let with_inline = state.in_clickhouse;
        let Some((head, inline)) = self
            .head_and_inline(id, state.generation, with_inline)
            .await?
        else {
            return Ok(WriteFacts { state, head: None });
        };
        let inline = match inline {
            Some(inline) => inline,
            // A legacy Group's inline array may be large: counted, not read.
            None => self.has_inline_members(id).await?,
        };
        Ok(WriteFacts {
            state,
            head: Some((head, inline)),
        })
    }

    /// The head of Group `id` as member key generation `generation` sees
    /// it, with whether the document holds members inline: what a write
    /// reads under the lock when the member state it saw before still holds.
    pub async fn head_with_inline(
        &self,
        id: &str,
        generation: i64,
    ) -> Result<Option<(GroupHead, bool)>, DocumentStoreError> {
        Ok(self
            .head_and_inline(id, generation, true)
            .await?
            .map(|(head, inline)| (head, inline.unwrap_or(false))))
    }

    pub async fn head_of_generation(
        &self,
        id: &str,
        generation: i64,
    ) -> Result<Option<GroupHead>, DocumentStoreError> {
        Ok(self
            .head_and_inline(id, generation, false)
            .await?
            .map(|(head, _)| head))
    }

    /// The head; with `with_inline`, also whether the document holds a
    /// non-empty `member` array (read with it: only for Groups whose array
    /// is normally absent).
    async fn head_and_inline(
        &self,
        id: &str,
        generation: i64,
        with_inline: bool,
    ) -> Result<Option<(GroupHead, Option<bool>)>, DocumentStoreError> {
        let mut projection = doc! {
            "id": 1, "meta": 1, "_uuid": 1, "_memberCommitToken": 1, "_sourceAssigningAuthority": 1,
            "_memberStorage": 1, "_memberGeneration": 1,
        };
        if with_inline {
            projection.insert("member", 1);
        }
        let mut cursor = self
            .groups
            .find(doc! { "id": id })
            .projection(projection)
            .limit(2)
            .await?;
        let mut found = Vec::new();
        while cursor.advance().await? {
            found.push(cursor.deserialize_current()?);
        }
        let document = match found.as_slice() {
            [] => return Ok(None),
            [document] => document,
            _ => return Err(DocumentStoreError::Ambiguous { id: id.into() }),
        };
        let mut head = parse_head(id, document)?;
        head.group_key = member_key(&head.group_key, generation);
        let inline = with_inline.then(|| {
            document
                .get_array("member")
                .is_ok_and(|members| !members.is_empty())
        });
        Ok(Some((head, inline)))
    }

    /// The id of the Group `address` names when it is not a plain id: the
    /// reference server's `id|owner` form, or a Group's `_uuid` (for ids that
    /// look like one). `None` for anything else, or when nothing matches.
    pub async fn id_for_address(
        &self,
        address: &str,
    ) -> Result<Option<String>, DocumentStoreError> {
        let filter = match address.split_once('|') {
            Some((id, owner)) if !id.is_empty() && !owner.is_empty() => {
                doc! { "id": id, "_sourceAssigningAuthority": owner }
            }
            Some(_) => return Ok(None),
            None if icanbwell_conventions::is_uuid(address) => doc! { "_uuid": address },
            None => return Ok(None),
        };
        let found = self
            .groups
            .find_one(filter)
            .projection(doc! { "id": 1 })
            .await?;
        Ok(found.and_then(|d| d.get_str("id").ok().map(str::to_string)))
    }

    /// Ids of Groups with a write left `pending` (its writer stopped or could
    /// not publish), at most `limit`.
    pub async fn groups_with_pending_writes(
        &self,
        limit: i64,
    ) -> Result<Vec<String>, DocumentStoreError> {
        ids_where(&self.states, doc! { "pending": { "$exists": true } }, limit).await
    }

    /// Whether the Group document still holds members inline (not migrated).
    pub async fn has_inline_members(&self, id: &str) -> Result<bool, DocumentStoreError> {
        let count = self
            .groups
            .count_documents(doc! { "id": id, "member.0": { "$exists": true } })
            .await?;
        Ok(count > 0)
    }

    /// Whether the Group document has a `member` key at all (an empty array
    /// counts): RFC 6902 lets `add /member/-` extend an empty array but not
    /// a missing one.
    pub async fn has_member_key(&self, id: &str) -> Result<bool, DocumentStoreError> {
        let count = self
            .groups
            .count_documents(doc! { "id": id, "member": { "$exists": true } })
            .await?;
        Ok(count > 0)
    }

    /// The tokens of the writes an earlier release left `pending` in a
    /// Group's member state: they may still need their staged events.
    pub async fn pending_tokens(&self) -> Result<Vec<String>, DocumentStoreError> {
        let mut cursor = self
            .states
            .find(doc! { "pending": { "$exists": true } })
            .projection(doc! { "pending.token": 1 })
            .await?;
        let mut tokens = Vec::new();
        while cursor.advance().await? {
            let state = cursor.deserialize_current()?;
            if let Ok(token) = state
                .get_document("pending")
                .and_then(|p| p.get_str("token"))
            {
                tokens.push(token.to_string());
            }
        }
        Ok(tokens)
    }

    pub async fn member_state(&self, id: &str) -> Result<MemberState, DocumentStoreError> {
        let state = self
            .states
            .find_one(doc! { "_id": id })
            .await?
            .unwrap_or_default();
        let pending = state.get_document("pending").ok().and_then(|p| {
            let version = p.get_i64("version").ok()? as u64;
            Some(PendingWrite {
                token: p.get_str("token").ok()?.to_string(),
                version,
                from_version: p.get_i64("fromVersion").map_or(version, |v| v as u64),
                url: p.get_str("url").unwrap_or_default().to_string(),
                committed_at: p.get_datetime("lastUpdated").ok().copied(),
                request_id: p.get_str("requestId").unwrap_or_default().to_string(),
                upstream_committed: p.get_bool("upstreamCommitted").unwrap_or(false),
                committed: p.get_bool("committed").unwrap_or(false),
            })
        });
        Ok(MemberState {
            in_clickhouse: state.get_str("storage").ok() == Some(STORAGE_CLICKHOUSE),
            generation: state.get_i64("generation").unwrap_or(0),
            inline_copy_at: parse_version("", state.get("inlineCopyAt")).ok(),
            past: state
                .get_array("past")
                .map(|past| {
                    past.iter()
                        .filter_map(|p| {
                            let p = p.as_document()?;
                            Some(PastGeneration {
                                key: p.get_str("key").ok()?.to_string(),
                                deleted_at: *p.get_datetime("deletedAt").ok()?,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
            pending,
        })
    }

    /// Tags the version the upstream wrote for a split patch with our token
    /// (best effort: `pending.upstreamCommitted` already proves the commit).
    pub async fn tag_version(
        &self,
        id: &str,
        version: u64,
        token: &str,
    ) -> Result<Option<Document>, DocumentStoreError> {
        Ok(self
            .groups
            .find_one_and_update(
                doc! { "id": id, "meta.versionId": version.to_string() },
                doc! { "$set": { "_memberCommitToken": token, "_memberStorage": STORAGE_CLICKHOUSE } },
            )
            .return_document(ReturnDocument::After)
            .await?
            .map(without_members))
    }

    /// Clears the pending write `pending_token` (its own writer's at the end
    /// of a write, or one a stopped writer left, cleared by the writer that
    /// now holds the lock) and, when it committed, marks the Group stored in
    /// ClickHouse; `false` when that record was no longer there.
    pub async fn clear_pending(
        &self,
        id: &str,
        pending_token: &str,
        committed: bool,
    ) -> Result<bool, DocumentStoreError> {
        let mut update = doc! { "$unset": { "pending": "" } };
        if committed {
            update.insert("$set", doc! { "storage": STORAGE_CLICKHOUSE });
        }
        let cleared = self
            .states
            .update_one(doc! { "_id": id, "pending.token": pending_token }, update)
            .await?;
        Ok(cleared.matched_count > 0)
    }

    /// Drops the member state of a deleted Group and starts a new generation:
    /// a Group created again with this id (and so the same `_uuid`) gets its
    /// own member key, since its versions may start over at 1.
    /// The finished generation's member key is kept with the time the delete
    /// began: versions written before it still read their rosters from it.
    pub async fn forget(
        &self,
        id: &str,
        finished_key: &str,
        deleted_at: DateTime,
    ) -> Result<(), DocumentStoreError> {
        let state = self.states.find_one(doc! { "_id": id }).await?;
        let next = state
            .as_ref()
            .and_then(|s| s.get_i64("generation").ok())
            .unwrap_or(0)
            + 1;
        let mut past = state
            .as_ref()
            .and_then(|s| s.get_array("past").ok())
            .cloned()
            .unwrap_or_default();
        past.push(Bson::Document(
            doc! { "key": finished_key, "deletedAt": deleted_at },
        ));
        self.states
            .replace_one(
                doc! { "_id": id },
                doc! { "_id": id, "generation": next, "past": past },
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    /// The commit point: moves `meta.versionId` from `expected` to `new_version`
    /// (one step per member patch of the write)
    /// only if nobody else did, and tags the version with our token. Returns
    /// the Group document after the update, or `None` when the version moved.
    pub async fn commit_version(
        &self,
        id: &str,
        expected: u64,
        new_version: u64,
        token: &str,
        committed_at: DateTime,
        generation: i64,
    ) -> Result<Option<Document>, DocumentStoreError> {
        let updated = self
            .groups
            .find_one_and_update(
                doc! { "id": id, "meta.versionId": expected.to_string() },
                doc! { "$set": {
                    "meta.versionId": new_version.to_string(),
                    "meta.lastUpdated": committed_at,
                    "_memberCommitToken": token,
                    // See the module docs: the proxy's own record is
                    // MemberState, which legacy rewrites cannot drop.
                    "_memberStorage": STORAGE_CLICKHOUSE,
                    "_memberGeneration": generation,
                } },
            )
            .return_document(ReturnDocument::After)
            .await?;
        // No projection here: FerretDB does not support it on findAndModify.
        // A committed Group keeps its members in ClickHouse, so this is small.
        Ok(updated.map(without_members))
    }

    /// The Group document (without `member`), for responses.
    pub async fn document(&self, id: &str) -> Result<Option<Document>, DocumentStoreError> {
        Ok(self
            .groups
            .find_one(doc! { "id": id })
            .projection(doc! { "member": 0 })
            .await?)
    }
}

/// A Group document as stored, unparsed: a migration walks its `member`
/// array without building a second copy of it (a document is at most 16 MiB).
pub struct StoredGroup {
    id: String,
    raw: RawDocumentBuf,
}

impl StoredGroup {
    /// `meta.versionId` exactly as stored, for conditional updates.
    pub fn version_id(&self) -> Result<Bson, DocumentStoreError> {
        let meta = self
            .raw
            .get_document("meta")
            .map_err(|e| self.malformed(&format!("meta: {e}")))?;
        let version_id = meta
            .get("versionId")
            .map_err(|e| self.malformed(&format!("meta.versionId: {e}")))?
            .ok_or_else(|| self.malformed("meta.versionId missing"))?;
        Bson::try_from(version_id.to_raw_bson())
            .map_err(|e| self.malformed(&format!("meta.versionId: {e}")))
    }

    pub fn version(&self) -> Result<u64, DocumentStoreError> {
        parse_version(&self.id, Some(&self.version_id()?))
    }

    fn member_array(&self) -> Result<Option<&RawArray>, DocumentStoreError> {
        match self.raw.get_array("member") {
            Ok(array) => Ok(Some(array)),
            Err(e) if matches!(e.kind, ValueAccessErrorKind::NotPresent) => Ok(None),
            Err(e) => Err(self.malformed(&format!("member is not an array: {e}"))),
        }
    }

    /// How many members the document holds inline.
    pub fn member_count(&self) -> Result<usize, DocumentStoreError> {
        Ok(self
            .member_array()?
            .map_or(0, |array| array.into_iter().count()))
    }

    /// The inline members as FHIR JSON, in array order, one at a time.
    pub fn members(
        &self,
    ) -> Result<
        impl Iterator<Item = Result<serde_json::Value, DocumentStoreError>> + '_,
        DocumentStoreError,
    > {
        let array = self.member_array()?;
        Ok(array.into_iter().flatten().map(move |item| {
            let item = item.map_err(|e| self.malformed(&format!("member: {e}")))?;
            let value = Bson::try_from(item.to_raw_bson())
                .map_err(|e| self.malformed(&format!("member: {e}")))?;
            Ok(bson_to_json(&value))
        }))
    }

    /// Bytes the document takes without its `member` array.
    pub fn size_without_members(&self) -> Result<usize, DocumentStoreError> {
        let members = self.member_array()?.map_or(0, |a| a.as_bytes().len());
        Ok(self.raw.as_bytes().len() - members)
    }

    fn malformed(&self, what: &str) -> DocumentStoreError {
        DocumentStoreError::Malformed {
            id: self.id.clone(),
            what: what.to_string(),
        }
    }
}

impl GroupDocuments {
    /// Group `id` as stored, members included (for migrations only).
    pub async fn stored_group(&self, id: &str) -> Result<Option<StoredGroup>, DocumentStoreError> {
        let mut cursor = self
            .groups
            .clone_with_type::<RawDocumentBuf>()
            .find(doc! { "id": id })
            .limit(2)
            .await?;
        let mut found = None;
        while cursor.advance().await? {
            if found.is_some() {
                return Err(DocumentStoreError::Ambiguous { id: id.into() });
            }
            found = Some(StoredGroup {
                id: id.to_string(),
                raw: RawDocumentBuf::from_bytes(cursor.current().as_bytes().to_vec()).map_err(
                    |e| DocumentStoreError::Malformed {
                        id: id.to_string(),
                        what: e.to_string(),
                    },
                )?,
            });
        }
        Ok(found)
    }

    /// The ids of the Groups matching `filter`, sorted.
    pub async fn group_ids(&self, filter: Document) -> Result<Vec<String>, DocumentStoreError> {
        let mut cursor = self
            .groups
            .find(filter)
            .projection(doc! { "id": 1 })
            .await?;
        let mut ids = Vec::new();
        while cursor.advance().await? {
            if let Ok(id) = cursor.current().get_str("id") {
                ids.push(id.to_string());
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Records where Group `id` keeps its members: in ClickHouse, or inline.
    /// Marks the Group migrated (its inline array, verified equal to the
    /// roster at `version_id`, still to be removed), or not migrated.
    pub async fn set_migrated(
        &self,
        id: &str,
        migrated: Option<&Bson>,
    ) -> Result<(), DocumentStoreError> {
        let update = match migrated {
            Some(version_id) => {
                doc! { "$set": { "storage": STORAGE_CLICKHOUSE, "inlineCopyAt": version_id.clone() } }
            }
            None => doc! { "$unset": { "storage": "", "inlineCopyAt": "" } },
        };
        let migrated = migrated.is_some();
        self.states
            .update_one(doc! { "_id": id }, update)
            .upsert(migrated)
            .await?;
        Ok(())
    }

    /// Removes the inline `member` array of a migrated Group, unless the
    /// document moved past `version_id` meanwhile. True when it was removed.
    pub async fn strip_inline_members(
        &self,
        id: &str,
        version_id: &Bson,
    ) -> Result<bool, DocumentStoreError> {
        let result = self
            .groups
            .update_one(
                doc! { "id": id, "meta.versionId": version_id.clone() },
                doc! { "$unset": { "member": "" }, "$set": { "_memberStorage": STORAGE_CLICKHOUSE } },
            )
            .await?;
        if result.matched_count == 0 {
            return Ok(false);
        }
        self.states
            .update_one(
                doc! { "_id": id },
                doc! { "$unset": { "inlineCopyAt": "" } },
            )
            .await?;
        Ok(true)
    }

    /// Writes `members` back as the inline `member` array (none: no array),
    /// unless the document moved past `version_id` meanwhile. True when
    /// written. The array goes out as raw BSON, built once: a roster near the
    /// 16 MiB limit is never held as a tree of documents.
    pub async fn restore_inline_members(
        &self,
        id: &str,
        version_id: &Bson,
        members: RawArrayBuf,
    ) -> Result<bool, DocumentStoreError> {
        let refused = |what: String| DocumentStoreError::Refused {
            id: id.to_string(),
            what,
        };
        let mut unset = RawDocumentBuf::new();
        unset.append("_memberStorage", "");
        unset.append("_memberGeneration", "");
        let mut update = RawDocumentBuf::new();
        if members.is_empty() {
            unset.append("member", "");
        } else {
            let mut set = RawDocumentBuf::new();
            set.append("member", members);
            update.append("$set", set);
        }
        update.append("$unset", unset);
        let mut statement = RawDocumentBuf::new();
        statement.append(
            "q",
            RawDocumentBuf::from_document(&doc! { "id": id, "meta.versionId": version_id.clone() })
                .map_err(|e| refused(e.to_string()))?,
        );
        statement.append("u", update);
        let mut updates = RawArrayBuf::new();
        updates.push(statement);
        let mut command = RawDocumentBuf::new();
        command.append("update", GROUP_COLLECTION);
        command.append("updates", updates);
        let reply = self.database.run_raw_command(command).await?;
        if let Ok(errors) = reply.get_array("writeErrors") {
            return Err(refused(format!("{errors:?}")));
        }
        let matched = match reply.get("n") {
            Some(Bson::Int32(n)) => i64::from(*n),
            Some(Bson::Int64(n)) => *n,
            _ => return Err(refused(format!("unexpected reply {reply}"))),
        };
        Ok(matched > 0)
    }

    /// Whether any Group keeps its members in ClickHouse.
    pub async fn any_migrated(&self) -> Result<bool, DocumentStoreError> {
        let found = self
            .states
            .find_one(doc! { "storage": STORAGE_CLICKHOUSE })
            .projection(doc! { "_id": 1 })
            .await?;
        Ok(found.is_some())
    }

    /// Which of `ids` keep their members in ClickHouse.
    pub async fn migrated_among(
        &self,
        ids: &[&str],
    ) -> Result<std::collections::HashSet<String>, DocumentStoreError> {
        let mut cursor = self
            .states
            .find(doc! { "_id": { "$in": ids }, "storage": STORAGE_CLICKHOUSE })
            .await?;
        let mut migrated = std::collections::HashSet::new();
        while cursor.advance().await? {
            if let Ok(id) = cursor.current().get_str("_id") {
                migrated.insert(id.to_string());
            }
        }
        Ok(migrated)
    }
}

/// The key of a Group's member events: its `_uuid`, suffixed from the second
/// generation on (after the Group was deleted and created again).
pub fn member_key(uuid: &str, generation: i64) -> String {
    if generation == 0 {
        uuid.to_string()
    } else {
        format!("{uuid}~{generation}")
    }
}

fn without_members(mut document: Document) -> Document {
    document.remove("member");
    document
}

/// `meta.versionId` of a Group document, if readable.
pub fn version_of(document: &Document) -> Option<u64> {
    let meta = document.get_document("meta").ok()?;
    parse_version("", meta.get("versionId")).ok()
}

fn parse_version(id: &str, version_id: Option<&Bson>) -> Result<u64, DocumentStoreError> {
    let malformed = |what: &str| DocumentStoreError::Malformed {
        id: id.to_string(),
        what: what.to_string(),
    };
    match version_id {
        Some(Bson::String(s)) => s
            .parse::<u64>()
            .map_err(|_| malformed("meta.versionId is not a number")),
        // Tolerated: some writers stored numbers.
        Some(Bson::Int32(n)) => Ok(*n as u64),
        Some(Bson::Int64(n)) => Ok(*n as u64),
        _ => Err(malformed("meta.versionId missing")),
    }
}

fn parse_head(id: &str, document: &Document) -> Result<GroupHead, DocumentStoreError> {
    let malformed = |what: &str| DocumentStoreError::Malformed {
        id: id.to_string(),
        what: what.to_string(),
    };
    let meta = document
        .get_document("meta")
        .map_err(|_| malformed("no meta"))?;
    let version = parse_version(id, meta.get("versionId"))?;
    let group_key = document
        .get_str("_uuid")
        .map(str::to_string)
        .map_err(|_| malformed("_uuid missing"))?;
    Ok(GroupHead {
        id: id.to_string(),
        group_key,
        version,
        last_updated: meta.get_datetime("lastUpdated").ok().copied(),
        commit_token: document
            .get_str("_memberCommitToken")
            .ok()
            .map(str::to_string),
        authority: document
            .get_str("_sourceAssigningAuthority")
            .ok()
            .map(str::to_string),
        marks: match (
            document.get_str("_memberStorage"),
            document.get_i64("_memberGeneration"),
        ) {
            (Ok(STORAGE_CLICKHOUSE), Ok(generation)) => Some(CommitMarks { generation }),
            _ => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_reads_string_versions_and_uuid() {
        let document = doc! { "id": "g", "_uuid": "u-1", "meta": { "versionId": "7", "lastUpdated": DateTime::from_millis(5) } };
        let head = parse_head("g", &document).unwrap();
        assert_eq!((head.version, head.group_key.as_str()), (7, "u-1"));
        assert_eq!(head.last_updated, Some(DateTime::from_millis(5)));
    }

    #[test]
    fn malformed_heads_say_what_is_wrong() {
        let err = parse_head(
            "g",
            &doc! { "id": "g", "meta": { "versionId": "x" }, "_uuid": "u" },
        )
        .unwrap_err();
        assert!(err.to_string().contains("versionId"), "{err}");
        let err = parse_head("g", &doc! { "id": "g", "meta": { "versionId": "1" } }).unwrap_err();
        assert!(err.to_string().contains("_uuid"), "{err}");
    }
}

/// The FHIR JSON of a stored document: server-internal fields (`_id`, `_uuid`,
/// anything starting with `_`) are dropped, BSON dates become FHIR instants.
pub fn to_fhir_json(document: &Document) -> serde_json::Value {
    let object = document
        .iter()
        .filter(|(key, _)| !key.starts_with('_'))
        .map(|(key, value)| (key.clone(), bson_to_json(value)))
        .collect();
    serde_json::Value::Object(object)
}

/// A stored document as JSON with its internal `_` fields (but no `_id`),
/// for code that shows it as the legacy server would.
pub fn to_internal_json(document: &Document) -> serde_json::Value {
    let object = document
        .iter()
        .filter(|(key, _)| *key != "_id")
        .map(|(key, value)| (key.clone(), bson_to_json(value)))
        .collect();
    serde_json::Value::Object(object)
}

fn bson_to_json(value: &Bson) -> serde_json::Value {
    match value {
        Bson::DateTime(date) => serde_json::Value::String(
            chrono::DateTime::<chrono::Utc>::from_timestamp_millis(date.timestamp_millis())
                .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
                .unwrap_or_default(),
        ),
        Bson::Document(inner) => serde_json::Value::Object(
            inner
                .iter()
                .map(|(k, v)| (k.clone(), bson_to_json(v)))
                .collect(),
        ),
        Bson::Array(items) => serde_json::Value::Array(items.iter().map(bson_to_json).collect()),
        Bson::Int32(n) => (*n).into(),
        Bson::Int64(n) => (*n).into(),
        Bson::Double(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Bson::String(s) => serde_json::Value::String(s.clone()),
        Bson::Boolean(b) => serde_json::Value::Bool(*b),
        Bson::Null | Bson::Undefined => serde_json::Value::Null,
        other => other.clone().into_relaxed_extjson(),
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;

    #[test]
    fn fhir_json_drops_internal_fields_and_renders_dates() {
        let document = doc! {
            "_id": mongodb::bson::oid::ObjectId::new(),
            "_uuid": "u",
            "resourceType": "Group",
            "id": "g",
            "meta": { "versionId": "2", "lastUpdated": DateTime::from_millis(1_700_000_000_123) },
            "quantity": 3_i64,
            "actual": true,
        };
        let json = to_fhir_json(&document);
        assert_eq!(
            json,
            serde_json::json!({
                "resourceType": "Group", "id": "g",
                "meta": { "versionId": "2", "lastUpdated": "2023-11-14T22:13:20.123Z" },
                "quantity": 3, "actual": true
            })
        );
    }
}
