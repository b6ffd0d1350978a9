//! Helpers shared by the fuzz targets: the reference framing decision of `framing_diff`.

pub mod rfc9112;
