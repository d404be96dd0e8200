//! ResourceSlices of a node's pool: building (pure), rendering per API version, and comparing
//! what was sent with what the API server kept.

pub mod build;
pub mod compare;
pub mod model;
pub mod render;

pub use build::{BuildError, build_pool, build_pool_with};
pub use model::{CounterLayout, PoolPlan, SharingMode};
pub use render::{ApiVersion, SliceMeta, render_pool, slice_name};

/// A DNS-1123 label (device and counter-set names).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (slice names).
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests;
