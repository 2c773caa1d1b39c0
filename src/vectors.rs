//! Exact nearest-neighbour search over L2-normalised `f32` vectors, shared by the semantic cache
//! and the knowledge base. An exact scan is the right structure at the sizes these hold (one
//! cache scope, one KB collection: up to tens of thousands of vectors): no build step, no recall
//! loss, deletes are O(1), and the dot product below compiles to packed SIMD on any x86-64.

use std::collections::HashMap;

/// Dot product; with normalised vectors, the cosine similarity. Sixteen independent lanes let
/// the compiler keep packed registers busy without reassociating floats on its own.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (ac, ar) = a.split_at(a.len() - a.len() % LANES);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        sum += x * y;
    }
    sum
}

/// Scales `v` to unit length in place (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = dot(v, v).sqrt();
    if norm > 0.0 {
        for x in v {
            *x /= norm;
        }
    }
}

/// Vectors stored contiguously, each under a caller-chosen `u64` id.
#[derive(Debug, Clone)]
pub struct FlatIndex {
    dims: usize,
    ids: Vec<u64>,
    data: Vec<f32>,
    slot: HashMap<u64, usize>,
}

impl FlatIndex {
    pub fn new(dims: usize) -> Self {
        FlatIndex {
            dims,
            ids: Vec::new(),
            data: Vec::new(),
            slot: HashMap::new(),
        }
    }

    pub fn dims(&self) -> usize {
        self.dims
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Adds `v` under `id`, replacing the vector `id` had. `v` must have `dims` entries.
    pub fn insert(&mut self, id: u64, v: &[f32]) {
        assert_eq!(v.len(), self.dims, "vector of the wrong dimension");
        match self.slot.get(&id) {
            Some(&i) => self.data[i * self.dims..(i + 1) * self.dims].copy_from_slice(v),
            None => {
                self.slot.insert(id, self.ids.len());
                self.ids.push(id);
                self.data.extend_from_slice(v);
            }
        }
    }

    /// The vector stored under `id`.
    pub fn get(&self, id: u64) -> Option<&[f32]> {
        let i = *self.slot.get(&id)?;
        Some(&self.data[i * self.dims..(i + 1) * self.dims])
    }

    /// Removes `id`'s vector (the last one moves into its place). Whether it was there.
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(i) = self.slot.remove(&id) else {
            return false;
        };
        let last = self.ids.len() - 1;
        if i != last {
            let moved = self.ids[last];
            self.ids[i] = moved;
            self.slot.insert(moved, i);
            let (head, tail) = self.data.split_at_mut(last * self.dims);
            head[i * self.dims..(i + 1) * self.dims].copy_from_slice(&tail[..self.dims]);
        }
        self.ids.pop();
        self.data.truncate(last * self.dims);
        true
    }

    /// The `k` most similar vectors scoring at least `min_score`, best first.
    pub fn search(&self, query: &[f32], k: usize, min_score: f32) -> Vec<(u64, f32)> {
        if k == 0 || query.len() != self.dims {
            return Vec::new();
        }
        let mut best: Vec<(u64, f32)> = Vec::with_capacity(k + 1);
        for (id, v) in self.ids.iter().zip(self.data.chunks_exact(self.dims)) {
            let s = dot(query, v);
            if s < min_score || (best.len() == k && s <= best[k - 1].1) {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= s);
            best.insert(at, (*id, s));
            best.truncate(k);
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let mut v = v.to_vec();
        normalize(&mut v);
        v
    }

    #[test]
    fn dot_matches_naive_for_odd_lengths() {
        for n in [1usize, 15, 16, 17, 384, 385] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-3, "n={n}");
        }
    }

    #[test]
    fn search_ranks_and_respects_threshold_and_removal() {
        let mut idx = FlatIndex::new(3);
        idx.insert(1, &unit(&[1.0, 0.0, 0.0]));
        idx.insert(2, &unit(&[0.9, 0.1, 0.0]));
        idx.insert(3, &unit(&[0.0, 1.0, 0.0]));
        let q = unit(&[1.0, 0.05, 0.0]);
        let hits = idx.search(&q, 2, 0.5);
        assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!(idx.search(&q, 5, 0.999).is_empty());

        assert!(idx.remove(1));
        assert!(!idx.remove(1));
        assert_eq!(idx.len(), 2);
        assert_eq!(idx.search(&q, 1, 0.0)[0].0, 2);
        // The moved vector is still found under its own id.
        assert_eq!(idx.search(&unit(&[0.0, 1.0, 0.0]), 1, 0.9)[0].0, 3);

        idx.insert(3, &unit(&[1.0, 0.0, 0.0]));
        assert_eq!(idx.len(), 2);
        assert_eq!(idx.search(&q, 1, 0.0)[0].0, 3);
    }
}
