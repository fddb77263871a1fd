//! TLS material read from PEM files, in one place for every listener and
//! client: the scaler port (KEDA's TriggerAuthentication), the peer protocol
//! (mTLS between daemons) and `gpu-scaler query`. A file that cannot be read
//! is an error naming it.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Identity};

/// A PEM file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading {}: {source}", path.display())]
pub struct Error {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The bytes of a PEM file.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error {
        path: path.to_owned(),
        source,
    })
}

/// A certificate chain and its key.
pub fn identity(cert: &Path, key: &Path) -> Result<Identity> {
    Ok(Identity::from_pem(read(cert)?, read(key)?))
}

/// A CA certificate (to verify the other side with).
pub fn certificate(path: &Path) -> Result<Certificate> {
    Ok(Certificate::from_pem(read(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named() {
        let err = identity(
            Path::new("/nonexistent/c.pem"),
            Path::new("/nonexistent/k.pem"),
        )
        .expect_err("missing");
        assert!(
            err.to_string().starts_with("reading /nonexistent/c.pem: "),
            "{err}"
        );
        assert_eq!(err.source.kind(), std::io::ErrorKind::NotFound);
    }
}
