//! Where the key-encryption key (KEK) comes from: a file (`--kek-file`,
//! checked like every secret file) or the variable `ISDP_KEK`, never a
//! flag's value (it would show in `ps`); during a rotation the previous
//! one likewise. Without either, the embedded store uses
//! `<data-dir>/kek`, generated on first start so a single node needs no
//! setup: the CA key is then sealed, but beside its KEK, and only moving
//! the KEK off the data disk protects a copied store file or backup.
//! Several replicas on etcd must share one, so there it is required
//! (`Config::validate`).

use std::path::{Path, PathBuf};

use super::{
    seal::{Kek, Keyring, SealError},
    stored_kek_id,
};
use crate::{
    data_dir::{self, DataDirError},
    store::{Store, StoreError},
};

use crate::data_dir::KEK_FILE;

/// The operator's KEK settings. `Debug` hides the variables' values.
#[derive(Clone, Default)]
pub struct KekSources {
    /// `--kek-file` / `ISDP_KEK_FILE`.
    pub file: Option<PathBuf>,
    /// The value of `ISDP_KEK`.
    pub env: Option<String>,
    /// `--previous-kek-file` / `ISDP_PREVIOUS_KEK_FILE`.
    pub previous_file: Option<PathBuf>,
    /// The value of `ISDP_PREVIOUS_KEK`.
    pub previous_env: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KekError {
    #[error("{origin}: {source}")]
    Invalid { origin: String, source: SealError },
    #[error(transparent)]
    File(#[from] DataDirError),
    #[error(
        "the CA key in the store is sealed with KEK {id}, but no KEK was given (--kek-file or \
         ISDP_KEK) and {path} does not exist; start with the KEK that sealed it"
    )]
    Lost { id: String, path: String },
    #[error("no KEK given (--kek-file or ISDP_KEK)")]
    Missing,
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

// === impl KekSources ===

impl KekSources {
    /// The KEKs the operator gave, read and parsed (files must be private);
    /// `None` without a current one.
    pub fn explicit(&self) -> Result<Option<Keyring>, KekError> {
        let current = load(self.file.as_deref(), self.env.as_deref(), "ISDP_KEK")?;
        let previous = load(
            self.previous_file.as_deref(),
            self.previous_env.as_deref(),
            "ISDP_PREVIOUS_KEK",
        )?;
        Ok(current.map(|c| Keyring::new(c, previous)))
    }
}

/// The keyring to seal with: the operator's (`given`, from
/// [`KekSources::explicit`]), or (`data_dir` given: the embedded store)
/// `<data-dir>/kek`, generated when the store holds no sealed key yet. A
/// store whose key is sealed under a KEK that is nowhere to be found is
/// refused, never sealed again under a new one.
pub async fn resolve(
    given: Option<Keyring>,
    data_dir: Option<&Path>,
    store: &dyn Store,
    prefix: &str,
) -> Result<Keyring, KekError> {
    if let Some(keys) = given {
        if let Some(dir) = data_dir
            && dir.join(KEK_FILE).exists()
        {
            tracing::warn!(
                path = %dir.join(KEK_FILE).display(),
                "a KEK was given, so the generated one in the data directory is unused: delete it once the CA key is sealed under the new one"
            );
        }
        tracing::info!(keys = %keys, "sealing the CA key with the KEK given");
        return Ok(keys);
    }
    let dir = data_dir.ok_or(KekError::Missing)?;
    let path = dir.join(KEK_FILE);
    if path.exists() {
        let text = data_dir::read_secret_file(&path, "KEK file")?;
        let kek = parse(&text, &path.display().to_string())?;
        tracing::info!(
            kek = kek.id(),
            path = %path.display(),
            "sealing the CA key with the KEK in the data directory; a copy of the directory holds both (move the KEK elsewhere and pass --kek-file)"
        );
        return Ok(Keyring::new(kek, None));
    }
    if let Some(id) = stored_kek_id(store, prefix).await? {
        return Err(KekError::Lost {
            id,
            path: path.display().to_string(),
        });
    }
    let kek = Kek::generate().map_err(|source| KekError::Invalid {
        origin: "generating a KEK".into(),
        source,
    })?;
    // On disk before anything is sealed with it.
    data_dir::write_secret(&path, format!("{}\n", kek.to_base64()).as_bytes()).map_err(
        |source| KekError::Write {
            path: path.display().to_string(),
            source,
        },
    )?;
    tracing::warn!(
        kek = kek.id(),
        path = %path.display(),
        "generated a key-encryption key for the CA key; it sits beside the store, so a copy of the data directory holds both: move it off the data disk and pass --kek-file (or ISDP_KEK)"
    );
    Ok(Keyring::new(kek, None))
}

impl std::fmt::Debug for KekSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "<hidden>");
        f.debug_struct("KekSources")
            .field("file", &self.file)
            .field("env", &hidden(&self.env))
            .field("previous_file", &self.previous_file)
            .field("previous_env", &hidden(&self.previous_env))
            .finish()
    }
}

fn load(file: Option<&Path>, env: Option<&str>, var: &str) -> Result<Option<Kek>, KekError> {
    match (file, env) {
        (Some(path), _) => {
            let text = data_dir::read_secret_file(path, "KEK file")?;
            parse(&text, &path.display().to_string()).map(Some)
        }
        (None, Some(text)) => parse(text, var).map(Some),
        (None, None) => Ok(None),
    }
}

fn parse(text: &str, origin: &str) -> Result<Kek, KekError> {
    Kek::from_base64(text).map_err(|source| KekError::Invalid {
        origin: origin.to_owned(),
        source,
    })
}
