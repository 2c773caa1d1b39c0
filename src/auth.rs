//! Bearer API keys to a [`Principal`] under the pinned policy.

use http::HeaderMap;
use http::header::AUTHORIZATION;

use crate::error::Error;
use crate::policy::{Policy, Principal};

/// Reads `Authorization: Bearer <key>`; the key itself is never logged or stored.
pub fn authenticate<'p>(headers: &HeaderMap, policy: &'p Policy) -> Result<&'p Principal, Error> {
    let value = headers
        .get(AUTHORIZATION)
        .ok_or(Error::InvalidApiKey { provided: false })?;
    let bytes = value.as_bytes();
    let key = bytes
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case(b"bearer "))
        .map(|_| bytes[7..].trim_ascii())
        .filter(|k| !k.is_empty())
        .ok_or(Error::InvalidApiKey { provided: false })?;
    policy
        .authenticate(key)
        .ok_or(Error::InvalidApiKey { provided: true })
}
