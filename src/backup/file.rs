//! The backup file: one file per backup, written once and read in order.
//!
//! ```text
//! PGTENANT-BACKUP 1\n
//! <kind> <index> <length>\n<bytes>      records: P pre-data SQL, D a chunk of table <index>'s COPY text,
//! ...                                           Q post-data SQL, M the manifest (JSON, last)
//! E <offset of M, 20 digits> <SHA-256 of every byte before this line>\n
//! ```
//!
//! The last line has a fixed length, so a listing finds the manifest without reading the data; a restore reads
//! the whole file once to check every checksum before it touches a database.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader, BufWriter};

use super::BackupError;

const MAGIC: &[u8] = b"PGTENANT-BACKUP 1\n";
/// `E ` + 20 digits + space + 64 hex digits + newline.
const END_LEN: u64 = 2 + 20 + 1 + 64 + 1;
/// Largest record of each kind accepted when reading (a writer never makes bigger ones).
const MAX_DATA: usize = 16 * 1024 * 1024;
const MAX_SQL: usize = 256 * 1024 * 1024;
const MAX_MANIFEST: usize = 64 * 1024 * 1024;
/// Longest record header line.
const MAX_HEADER: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PreData,
    Data,
    PostData,
    Manifest,
}

impl Kind {
    fn tag(self) -> u8 {
        match self {
            Kind::PreData => b'P',
            Kind::Data => b'D',
            Kind::PostData => b'Q',
            Kind::Manifest => b'M',
        }
    }

    fn of(tag: u8) -> Option<Kind> {
        Some(match tag {
            b'P' => Kind::PreData,
            b'D' => Kind::Data,
            b'Q' => Kind::PostData,
            b'M' => Kind::Manifest,
            _ => return None,
        })
    }

    fn max(self) -> usize {
        match self {
            Kind::Data => MAX_DATA,
            Kind::PreData | Kind::PostData => MAX_SQL,
            Kind::Manifest => MAX_MANIFEST,
        }
    }
}

/// Writes a backup to `<path>.partial`, renamed to `path` only when complete and synced.
pub struct Writer {
    out: BufWriter<tokio::fs::File>,
    hash: Sha256,
    written: u64,
    partial: PathBuf,
    path: PathBuf,
}

impl Writer {
    pub async fn create(path: &Path) -> Result<Writer, BackupError> {
        let partial = path.with_extension("partial");
        // A backup holds every row of the tenant: readable by the proxy's user only, whatever the umask.
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .await
            .map_err(|e| BackupError::io(&partial, e))?;
        let mut w = Writer {
            out: BufWriter::with_capacity(256 * 1024, file),
            hash: Sha256::new(),
            written: 0,
            partial,
            path: path.to_owned(),
        };
        w.put(MAGIC).await?;
        Ok(w)
    }

    async fn put(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        self.hash.update(bytes);
        self.written += bytes.len() as u64;
        self.out
            .write_all(bytes)
            .await
            .map_err(|e| BackupError::io(&self.partial, e))
    }

    pub async fn record(&mut self, kind: Kind, index: u32, data: &[u8]) -> Result<(), BackupError> {
        if data.len() > kind.max() {
            return Err(BackupError::Format(format!(
                "a {kind:?} record of {} bytes is over the limit",
                data.len()
            )));
        }
        let header = format!("{} {index} {}\n", kind.tag() as char, data.len());
        self.put(header.as_bytes()).await?;
        self.put(data).await
    }

    /// Writes the manifest and the end line, syncs, and renames the file into place. Returns its size.
    pub async fn finish(mut self, manifest: &[u8]) -> Result<u64, BackupError> {
        let at = self.written;
        self.record(Kind::Manifest, 0, manifest).await?;
        let digest = crate::state::hex(&std::mem::take(&mut self.hash).finalize());
        let end = format!("E {at:020} {digest}\n");
        self.out
            .write_all(end.as_bytes())
            .await
            .map_err(|e| BackupError::io(&self.partial, e))?;
        self.out
            .flush()
            .await
            .map_err(|e| BackupError::io(&self.partial, e))?;
        self.out
            .get_ref()
            .sync_all()
            .await
            .map_err(|e| BackupError::io(&self.partial, e))?;
        tokio::fs::rename(&self.partial, &self.path)
            .await
            .map_err(|e| BackupError::io(&self.path, e))?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = tokio::fs::File::open(dir).await {
                let _ = d.sync_all().await;
            }
        }
        Ok(self.written + end.len() as u64)
    }

    /// Removes the unfinished file (a failed backup leaves nothing behind).
    pub async fn discard(self) {
        drop(self.out);
        let _ = tokio::fs::remove_file(&self.partial).await;
    }
}

/// Reads a backup's records in order, checking the whole-file checksum at the end.
pub struct Reader {
    input: BufReader<tokio::fs::File>,
    hash: Sha256,
    path: PathBuf,
    done: bool,
}

pub struct Record {
    pub kind: Kind,
    pub index: u32,
    pub data: Vec<u8>,
}

impl Reader {
    pub async fn open(path: &Path) -> Result<Reader, BackupError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| BackupError::io(path, e))?;
        let mut r = Reader {
            input: BufReader::with_capacity(256 * 1024, file),
            hash: Sha256::new(),
            path: path.to_owned(),
            done: false,
        };
        let mut magic = vec![0; MAGIC.len()];
        r.input
            .read_exact(&mut magic)
            .await
            .map_err(|_| r.corrupt("not a pgtenant backup (too short)"))?;
        if magic != MAGIC {
            return Err(r.corrupt("not a pgtenant backup (no PGTENANT-BACKUP 1 header)"));
        }
        r.hash.update(&magic);
        Ok(r)
    }

    fn corrupt(&self, why: &str) -> BackupError {
        BackupError::Corrupt(format!("{}: {why}", self.path.display()))
    }

    async fn line(&mut self) -> Result<Vec<u8>, BackupError> {
        let mut line = Vec::with_capacity(MAX_HEADER);
        loop {
            let b = self
                .input
                .read_u8()
                .await
                .map_err(|_| self.corrupt("cut short (no end line)"))?;
            if b == b'\n' {
                return Ok(line);
            }
            line.push(b);
            if line.len() > MAX_HEADER + 64 {
                return Err(self.corrupt("a record header is too long"));
            }
        }
    }

    /// The next record; `None` after the end line, whose checksum has then been checked.
    pub async fn next(&mut self) -> Result<Option<Record>, BackupError> {
        if self.done {
            return Ok(None);
        }
        let line = self.line().await?;
        let text = String::from_utf8_lossy(&line).into_owned();
        let mut parts = text.split(' ');
        let tag = parts.next().unwrap_or_default();
        if tag == "E" {
            return self
                .end(parts.nth(1).unwrap_or_default())
                .await
                .map(|_| None);
        }
        self.hash.update(&line);
        self.hash.update(b"\n");
        let kind = tag
            .bytes()
            .next()
            .filter(|_| tag.len() == 1)
            .and_then(Kind::of)
            .ok_or_else(|| self.corrupt("unknown record"))?;
        let index: u32 = parts
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| self.corrupt("bad record header"))?;
        let len: usize = parts
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| self.corrupt("bad record header"))?;
        if len > kind.max() {
            return Err(self.corrupt("a record is over its size limit"));
        }
        let mut data = vec![0; len];
        self.input
            .read_exact(&mut data)
            .await
            .map_err(|_| self.corrupt("cut short inside a record"))?;
        self.hash.update(&data);
        Ok(Some(Record { kind, index, data }))
    }

    async fn end(&mut self, digest: &str) -> Result<(), BackupError> {
        let ours = crate::state::hex(&std::mem::take(&mut self.hash).finalize());
        if ours != digest {
            return Err(BackupError::Corrupt(format!(
                "{}: checksum mismatch (the file says {digest:.16}..., its contents hash to {ours:.16}...): refusing to restore a damaged backup",
                self.path.display()
            )));
        }
        let mut rest = [0u8; 1];
        if self
            .input
            .read(&mut rest)
            .await
            .map_err(|e| BackupError::io(&self.path, e))?
            != 0
        {
            return Err(self.corrupt("bytes after the end line"));
        }
        self.done = true;
        Ok(())
    }
}

/// The manifest of a backup without reading its data (for listings; the checksum is not checked here).
pub async fn manifest_bytes(path: &Path) -> Result<Vec<u8>, BackupError> {
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| BackupError::io(path, e))?;
    let size = f
        .metadata()
        .await
        .map_err(|e| BackupError::io(path, e))?
        .len();
    let corrupt = |why: &str| BackupError::Corrupt(format!("{}: {why}", path.display()));
    if size < MAGIC.len() as u64 + END_LEN {
        return Err(corrupt("too short"));
    }
    let mut end = vec![0; END_LEN as usize];
    f.seek(std::io::SeekFrom::Start(size - END_LEN))
        .await
        .map_err(|e| BackupError::io(path, e))?;
    f.read_exact(&mut end)
        .await
        .map_err(|e| BackupError::io(path, e))?;
    let at: u64 = std::str::from_utf8(&end[2..22])
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|_| end.starts_with(b"E "))
        .ok_or_else(|| corrupt("no end line"))?;
    f.seek(std::io::SeekFrom::Start(at))
        .await
        .map_err(|e| BackupError::io(path, e))?;
    let mut head = vec![0; MAX_HEADER.min((size - at) as usize)];
    f.read_exact(&mut head)
        .await
        .map_err(|e| BackupError::io(path, e))?;
    let nl = head
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| corrupt("bad manifest header"))?;
    let text = String::from_utf8_lossy(&head[..nl]).into_owned();
    let len: usize = text
        .strip_prefix("M 0 ")
        .and_then(|n| n.parse().ok())
        .filter(|n| *n <= MAX_MANIFEST)
        .ok_or_else(|| corrupt("bad manifest header"))?;
    f.seek(std::io::SeekFrom::Start(at + nl as u64 + 1))
        .await
        .map_err(|e| BackupError::io(path, e))?;
    let mut data = vec![0; len];
    f.read_exact(&mut data)
        .await
        .map_err(|e| BackupError::io(path, e))?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sample(dir: &Path) -> PathBuf {
        let path = dir.join("t.pgtbackup");
        let mut w = Writer::create(&path).await.unwrap();
        w.record(Kind::PreData, 0, b"CREATE TABLE x (a int);")
            .await
            .unwrap();
        w.record(Kind::Data, 0, b"1\n2\n").await.unwrap();
        w.record(Kind::PostData, 0, b"").await.unwrap();
        w.finish(b"{\"m\":1}").await.unwrap();
        path
    }

    async fn read_all(path: &Path) -> Result<Vec<(Kind, Vec<u8>)>, BackupError> {
        let mut r = Reader::open(path).await?;
        let mut out = Vec::new();
        while let Some(rec) = r.next().await? {
            out.push((rec.kind, rec.data));
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_backup_reads_back_and_its_manifest_is_found_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path()).await;
        let recs = read_all(&path).await.unwrap();
        assert_eq!(recs.len(), 4);
        assert_eq!(recs[1], (Kind::Data, b"1\n2\n".to_vec()));
        assert_eq!(manifest_bytes(&path).await.unwrap(), b"{\"m\":1}");
        assert!(!path.with_extension("partial").exists());
    }

    #[tokio::test]
    async fn a_changed_byte_or_a_cut_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path()).await;
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        let at = good.windows(4).position(|w| w == b"1\n2\n").unwrap();
        bad[at] = b'7';
        std::fs::write(&path, &bad).unwrap();
        let e = read_all(&path).await.unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        std::fs::write(&path, &good[..good.len() - 30]).unwrap();
        assert!(matches!(
            read_all(&path).await,
            Err(BackupError::Corrupt(_))
        ));
        std::fs::write(&path, b"hello").unwrap();
        assert!(matches!(
            read_all(&path).await,
            Err(BackupError::Corrupt(_))
        ));
    }
}
