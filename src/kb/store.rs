//! A generation on disk: one JSON file per collection (chunks with their vectors as base64
//! little-endian `f32`), written to a temporary file, synced and renamed into place, so a crash
//! leaves the previous file or the new one, never half of one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::Generation;
use super::chunk::Chunk;
use crate::vectors::FlatIndex;

const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Stored {
    format: u32,
    /// [`crate::embed::Embedder::fingerprint`] of the model that made the vectors.
    embedder: String,
    collection: String,
    generation: String,
    files: BTreeMap<String, String>,
    chunks: Vec<StoredChunk>,
}

#[derive(Serialize, Deserialize)]
struct StoredChunk {
    source: String,
    ordinal: u32,
    headings: Vec<String>,
    text: String,
    hash: String,
    vector: String,
}

fn hash_of(hex_str: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_str, &mut out).map_err(|e| format!("bad hash: {e}"))?;
    Ok(out)
}

pub fn save(path: &Path, g: &Generation, embedder: &str) -> std::io::Result<()> {
    let stored = Stored {
        format: FORMAT,
        embedder: embedder.to_string(),
        collection: g.collection.to_string(),
        generation: format!("{:016x}", g.id),
        files: g
            .files
            .iter()
            .map(|(k, v)| (k.clone(), hex::encode(v)))
            .collect(),
        chunks: g
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let v = g.vector(i).unwrap_or(&[]);
                let mut bytes = Vec::with_capacity(v.len() * 4);
                for x in v {
                    bytes.extend_from_slice(&x.to_le_bytes());
                }
                StoredChunk {
                    source: c.source.clone(),
                    ordinal: c.ordinal,
                    headings: c.headings.clone(),
                    text: c.text.clone(),
                    hash: hex::encode(c.hash),
                    vector: STANDARD.encode(bytes),
                }
            })
            .collect(),
    };
    let json = serde_json::to_vec(&stored).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The stored generation of `collection`; `None` when there is none or another embedder made it.
pub fn load(
    path: &Path,
    collection: &str,
    embedder: &str,
    dims: usize,
) -> Result<Option<Generation>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let stored: Stored =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if stored.format != FORMAT || stored.embedder != embedder || stored.collection != collection {
        tracing::info!(collection, stored = %stored.embedder, now = %embedder, "stored knowledge-base index is from another embedder or format; re-embedding");
        return Ok(None);
    }
    let mut files = BTreeMap::new();
    for (k, v) in stored.files {
        files.insert(k, hash_of(&v)?);
    }
    let mut chunks = Vec::with_capacity(stored.chunks.len());
    let mut vectors = FlatIndex::new(dims);
    for (i, c) in stored.chunks.into_iter().enumerate() {
        let bytes = STANDARD
            .decode(&c.vector)
            .map_err(|e| format!("chunk {i}: vector: {e}"))?;
        if bytes.len() != dims * 4 {
            return Err(format!("chunk {i}: vector has the wrong length"));
        }
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        vectors.insert(i as u64, &v);
        chunks.push(Chunk {
            source: c.source,
            ordinal: c.ordinal,
            headings: c.headings,
            text: c.text,
            hash: hash_of(&c.hash)?,
        });
    }
    Ok(Some(Generation::new(
        collection.into(),
        chunks,
        files,
        vectors,
    )))
}
