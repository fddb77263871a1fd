//! The client identity pinned on the scaler port: with mTLS, a certificate the
//! client CA signed is not enough; it must also carry one of the configured DNS
//! names as a SAN (KEDA's client certificate's). So a certificate issued by the
//! same CA for another purpose (the daemons' peer certificate, another team's
//! client) cannot ask for any namespace's figures (docs/security.md, threat
//! model).
//!
//! A tower layer around the tonic server: the TLS session's peer certificates
//! are in the request's extensions; a request without an acceptable one gets
//! PERMISSION_DENIED before any service sees it.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt as _};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// Why a client certificate is not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("the client certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("the client certificate carries none of the accepted names ({0})")]
    WrongName(String),
}

/// Whether the leaf certificate `der` carries one of `names` as a DNS SAN.
pub fn check(der: &[u8], names: &[String]) -> Result<(), Error> {
    let der = rustls_pki_types::CertificateDer::from(der);
    let cert =
        webpki::EndEntityCert::try_from(&der).map_err(|e| Error::Unparsable(format!("{e:?}")))?;
    let ok = names.iter().any(|n| {
        rustls_pki_types::ServerName::try_from(n.as_str())
            .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err(Error::WrongName(names.join(", ")))
    }
}

/// Adds [`Pinned`] around a service; with no names it passes every request.
#[derive(Clone)]
pub struct Layer {
    names: Arc<[String]>,
}

impl Layer {
    pub fn new(names: Vec<String>) -> Self {
        Self {
            names: names.into(),
        }
    }
}

impl<S> tower::Layer<S> for Layer {
    type Service = Pinned<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Pinned {
            inner,
            names: self.names.clone(),
        }
    }
}

/// A service that lets through only requests whose client certificate
/// [`check`]s.
#[derive(Clone)]
pub struct Pinned<S> {
    inner: S,
    names: Arc<[String]>,
}

impl<S, B> tower::Service<http::Request<B>> for Pinned<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if self.names.is_empty() {
            return self.inner.call(req).boxed();
        }
        let verdict = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .and_then(|certs| certs.first().cloned())
            .map_or(Err(Error::NoCertificate), |leaf| {
                check(leaf.as_ref(), &self.names)
            });
        match verdict {
            Ok(()) => self.inner.call(req).boxed(),
            Err(error) => {
                let remote = req
                    .extensions()
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|i| i.get_ref().remote_addr());
                tracing::warn!(?remote, %error, "client certificate refused");
                let status = tonic::Status::permission_denied(error.to_string());
                std::future::ready(Ok(status.into_http())).boxed()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(
            names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
        )
        .expect("params");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn only_the_pinned_names_pass() {
        let keda = cert(&["keda-operator.keda.svc"]);
        let peer = cert(&["gpu-scaler-peers"]);
        let pinned = vec!["keda-operator.keda.svc".to_owned()];
        assert_eq!(check(&keda, &pinned), Ok(()));
        let e = check(&peer, &pinned).expect_err("another name");
        assert!(e.to_string().contains("keda-operator.keda.svc"), "{e}");
        assert!(matches!(
            check(b"not a certificate", &pinned),
            Err(Error::Unparsable(_))
        ));
        // Either of two names.
        let two = vec!["a.example".to_owned(), "gpu-scaler-peers".to_owned()];
        assert_eq!(check(&peer, &two), Ok(()));
    }
}
