//! The local image registry: one JSON file per image, written atomically, with mutations
//! serialised by a lock file so that concurrent bakes cannot register the same name twice.

use crate::provider::{Document, Image};
use nix::fcntl::{Flock, FlockArg};
use snafu::{ensure, ResultExt, Snafu};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("image registry I/O on {}: {source}", path.display()))]
    Io { path: PathBuf, source: std::io::Error },

    #[snafu(display("locking the image registry: {source}"))]
    Lock { source: nix::Error },

    #[snafu(display("image record {} is unreadable: {source}", path.display()))]
    Parse { path: PathBuf, source: serde_json::Error },

    #[snafu(display("an image named {name:?} already exists ({id})"))]
    NameTaken { name: String, id: String },
}

pub type Result<T> = std::result::Result<T, Error>;

pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    pub fn open(state_dir: &Path) -> Result<Registry> {
        let dir = state_dir.join("images");
        fs::create_dir_all(&dir).context(IoSnafu { path: &dir })?;
        Ok(Registry { dir })
    }

    fn lock(&self) -> Result<Flock<File>> {
        let path = self.dir.join(".lock");
        let file = File::create(&path).context(IoSnafu { path })?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| e).context(LockSnafu)
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// `ID.manifest`, `ID.sbom`, …: not `.json`, so listings skip them.
    fn document_path(&self, id: &str, document: Document) -> PathBuf {
        self.dir.join(format!("{id}.{}", document.as_str()))
    }

    pub fn put_document(&self, id: &str, document: Document, content: &[u8]) -> Result<()> {
        let path = self.document_path(id, document);
        crate::atomic::write(&path, content).context(IoSnafu { path })
    }

    pub fn get_document(&self, id: &str, document: Document) -> Result<Option<Vec<u8>>> {
        let path = self.document_path(id, document);
        match fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            other => other.map(Some).context(IoSnafu { path }),
        }
    }

    pub fn register(&self, image: &Image) -> Result<()> {
        let _guard = self.lock()?;
        if let Some(existing) = self.list()?.into_iter().find(|i| i.name == image.name) {
            ensure!(existing.id == image.id, NameTakenSnafu { name: &image.name, id: existing.id });
        }
        self.write(image)
    }

    /// Adds or replaces tags under the lock, so concurrent taggers do not lose each other's
    /// tags; returns false when the image does not exist.
    pub fn tag(&self, id: &str, tags: &std::collections::BTreeMap<String, String>) -> Result<bool> {
        let _guard = self.lock()?;
        let Some(mut image) = self.get(id)? else { return Ok(false) };
        image.tags.extend(tags.clone());
        self.write(&image)?;
        Ok(true)
    }

    fn write(&self, image: &Image) -> Result<()> {
        let path = self.path(&image.id);
        let json = serde_json::to_vec_pretty(image).expect("images serialise");
        crate::atomic::write(&path, &json).context(IoSnafu { path })
    }

    pub fn get(&self, id: &str) -> Result<Option<Image>> {
        let path = self.path(id);
        match fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Io { path, source }),
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).context(ParseSnafu { path }),
        }
    }

    /// All images, newest first.
    pub fn list(&self) -> Result<Vec<Image>> {
        let mut images = Vec::new();
        for entry in fs::read_dir(&self.dir).context(IoSnafu { path: &self.dir })? {
            let path = entry.context(IoSnafu { path: &self.dir })?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let bytes = fs::read(&path).context(IoSnafu { path: &path })?;
            images.push(serde_json::from_slice::<Image>(&bytes).context(ParseSnafu { path: &path })?);
        }
        images.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.id.cmp(&a.id)));
        Ok(images)
    }

    pub fn remove(&self, id: &str) -> Result<()> {
        let _guard = self.lock()?;
        let documents = Document::ALL.map(|document| self.document_path(id, document));
        for path in documents.into_iter().chain([self.path(id)]) {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).context(IoSnafu { path }),
                _ => {}
            }
        }
        Ok(())
    }
}
