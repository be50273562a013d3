//! libpq's `sslmode` semantics on rustls.
//!
//! tokio-postgres only knows disable/prefer/require and never verifies a
//! certificate itself; what libpq checks in each mode is decided here, by the
//! certificate verifier put into the rustls `ClientConfig`:
//!
//! | sslmode       | verification                                               |
//! |---------------|------------------------------------------------------------|
//! | disable       | no TLS                                                     |
//! | allow/prefer  | none (libpq does not verify in these modes)                |
//! | require       | none, or as verify-ca when a root certificate is available |
//! | verify-ca     | chain up to `sslrootcert`, host name ignored               |
//! | verify-full   | chain and host name                                        |
//!
//! One provider (ring) is named explicitly so that no other dependency can
//! make rustls panic over an ambiguous process default.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::conninfo::{ResolvedConn, SslMode};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "sslmode={mode} needs a root certificate, and {path} does not exist; \
         give one with sslrootcert=FILE, or use a weaker sslmode"
    )]
    MissingRootCert { mode: &'static str, path: PathBuf },
    #[error("cannot read the certificate file {path}: {detail}")]
    BadFile { path: PathBuf, detail: String },
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configuration for a resolved connection.
pub fn client_config(conn: &ResolvedConn) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let verify = match (conn.sslmode, &conn.sslrootcert) {
        (SslMode::Disable | SslMode::Allow | SslMode::Prefer, _) => Verify::Nothing,
        (SslMode::Require, None) => Verify::Nothing,
        (SslMode::Require | SslMode::VerifyCa, Some(root)) => Verify::Chain(load_roots(root)?),
        (SslMode::VerifyFull, Some(root)) => Verify::Full(load_roots(root)?),
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(TlsError::MissingRootCert {
                mode: if conn.sslmode == SslMode::VerifyCa { "verify-ca" } else { "verify-full" },
                path: dirs::home_dir().unwrap_or_default().join(".postgresql/root.crt"),
            });
        }
    };
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Nothing => Arc::new(AcceptAnyCertificate { algorithms }),
        Verify::Chain(roots) => Arc::new(IgnoreHostName(webpki(roots, &provider)?)),
        Verify::Full(roots) => webpki(roots, &provider)?,
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&conn.sslcert, &conn.sslkey) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad_file(cert, e))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad_file(key, e))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| TlsError::Config(e.to_string()))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

enum Verify {
    Nothing,
    Chain(RootCertStore),
    Full(RootCertStore),
}

fn bad_file(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::BadFile { path: path.to_path_buf(), detail: e.to_string() }
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad_file(path, e))?;
    if certs.is_empty() {
        return Err(bad_file(path, "no PEM certificate found"));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| bad_file(path, e))?;
    }
    Ok(roots)
}

fn webpki(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))
}

/// libpq's prefer/require without a root certificate: encrypt, trust anyone.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// libpq's verify-ca: the full WebPKI check, except that a certificate issued
/// for another host name is accepted.
#[derive(Debug)]
struct IgnoreHostName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
