//! Qdrant as the vector store of the knowledge base (`kb.qdrant_url` in fuke.yaml): one Qdrant
//! collection `<qdrant_prefix><collection>` (default `fuke_`) per KB collection, one point per chunk. Point ids are derived
//! from the chunk (source, ordinal, content hash), so an unchanged chunk keeps its point and an
//! index run only upserts what is new. Queries map points back through the generation they
//! hold: a point that is not in it (written for the next generation, or left from an older
//! one) is ignored, which keeps the switch between generations atomic.

use std::collections::HashMap;

use qdrant_client::Qdrant;
use qdrant_client::qdrant::{
    CreateCollectionBuilder, DeletePointsBuilder, Distance, PointId, PointStruct, PointsIdsList,
    SearchPointsBuilder, UpsertPointsBuilder, VectorParamsBuilder, point_id::PointIdOptions,
};
use sha2::{Digest, Sha256};

use super::Generation;
use super::chunk::Chunk;
use crate::error::Error;

pub struct Remote {
    client: Qdrant,
    prefix: String,
}

const UPSERT_BATCH: usize = 256;
const SEARCH_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(250);

pub fn point_id(c: &Chunk) -> u64 {
    let mut h = Sha256::new();
    h.update(c.source.as_bytes());
    h.update([0]);
    h.update(c.ordinal.to_le_bytes());
    h.update(c.hash);
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().unwrap_or_default())
}

fn ids(g: &Generation) -> &HashMap<u64, usize> {
    g.points.get_or_init(|| {
        g.chunks
            .iter()
            .enumerate()
            .map(|(i, c)| (point_id(c), i))
            .collect()
    })
}

impl Remote {
    pub fn connect(url: &str, api_key_env: Option<&str>, prefix: &str) -> Result<Remote, String> {
        let key = match api_key_env {
            Some(var) => Some(
                std::env::var(var)
                    .map_err(|_| format!("kb.qdrant_api_key_env: variable `{var}` is not set"))?,
            ),
            None => None,
        };
        let client = Qdrant::from_url(url)
            .api_key(key)
            .connect_timeout(std::time::Duration::from_secs(2))
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| format!("kb.qdrant_url: {e}"))?;
        Ok(Remote {
            client,
            prefix: prefix.to_string(),
        })
    }

    fn name_of(&self, collection: &str) -> String {
        format!("{}{collection}", self.prefix)
    }

    /// Creates the collection if needed and writes every point of `g` (payload: source, heading
    /// trail, content hash, text).
    pub async fn upsert(&self, g: &Generation, dims: usize) -> Result<(), String> {
        let name = self.name_of(&g.collection);
        let exists = self
            .client
            .collection_exists(&name)
            .await
            .map_err(|e| format!("Qdrant: {e}"))?;
        if !exists {
            self.client
                .create_collection(
                    CreateCollectionBuilder::new(&name)
                        .vectors_config(VectorParamsBuilder::new(dims as u64, Distance::Cosine)),
                )
                .await
                .map_err(|e| format!("Qdrant: creating {name}: {e}"))?;
        }
        let mut points = Vec::with_capacity(UPSERT_BATCH);
        for (i, c) in g.chunks.iter().enumerate() {
            let Some(v) = g.vector(i) else { continue };
            let mut payload = qdrant_client::Payload::new();
            payload.insert("collection", g.collection.to_string());
            payload.insert("source", c.source.clone());
            payload.insert("ordinal", i64::from(c.ordinal));
            payload.insert("heading", c.headings.join(" > "));
            payload.insert("hash", hex::encode(c.hash));
            payload.insert("text", c.text.clone());
            points.push(PointStruct::new(point_id(c), v.to_vec(), payload));
            if points.len() == UPSERT_BATCH {
                self.write(&name, std::mem::take(&mut points)).await?;
            }
        }
        if !points.is_empty() {
            self.write(&name, points).await?;
        }
        Ok(())
    }

    async fn write(&self, name: &str, points: Vec<PointStruct>) -> Result<(), String> {
        self.client
            .upsert_points(UpsertPointsBuilder::new(name, points).wait(true))
            .await
            .map(|_| ())
            .map_err(|e| format!("Qdrant: upserting into {name}: {e}"))
    }

    /// Deletes the points of `old` that `current` no longer has.
    pub async fn remove_stale(&self, old: &Generation, current: &Generation) -> Result<(), String> {
        let keep = ids(current);
        let stale: Vec<PointId> = ids(old)
            .keys()
            .filter(|id| !keep.contains_key(id))
            .map(|&id| PointId::from(id))
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        let name = self.name_of(&current.collection);
        self.client
            .delete_points(
                DeletePointsBuilder::new(&name)
                    .points(PointsIdsList { ids: stale })
                    .wait(true),
            )
            .await
            .map(|_| ())
            .map_err(|e| format!("Qdrant: deleting from {name}: {e}"))
    }

    /// Positions in `g` of the `limit` nearest chunks.
    pub async fn search(
        &self,
        g: &Generation,
        query: &[f32],
        limit: usize,
    ) -> Result<Vec<usize>, Error> {
        let name = self.name_of(&g.collection);
        let unavailable = |detail: String| Error::Unavailable {
            message: "The knowledge base's vector store is unavailable.".into(),
            detail,
        };
        // A request waits this long for Qdrant at most; then the local copy answers.
        let found = tokio::time::timeout(
            SEARCH_TIMEOUT,
            self.client.search_points(SearchPointsBuilder::new(
                &name,
                query.to_vec(),
                limit as u64,
            )),
        )
        .await
        .map_err(|_| unavailable(format!("Qdrant: no answer within {SEARCH_TIMEOUT:?}")))?
        .map_err(|e| unavailable(format!("Qdrant: {e}")))?;
        let map = ids(g);
        Ok(found
            .result
            .iter()
            .filter_map(|p| match p.id.as_ref()?.point_id_options.as_ref()? {
                PointIdOptions::Num(n) => map.get(n).copied(),
                PointIdOptions::Uuid(_) => None,
            })
            .collect())
    }
}
