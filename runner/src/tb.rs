//! TensorBoard event files: every run writes `runs/<run>/tb/events.out.tfevents.*`, so that
//! `tensorboard --logdir runs/` shows the run live.
//!
//! The file format is TensorFlow's TFRecord of `Event` protobufs: each record is the payload's
//! length (u64, little-endian), the masked CRC32C of those 8 bytes, the payload, and the masked
//! CRC32C of the payload. The protobuf messages are the few TensorBoard reads here (`Event`,
//! `Summary` with scalars, images, histograms and text tensors, `SessionLog`), declared with
//! `prost`'s derive (no `protoc` at build time); the CRC is the `crc32c` crate's.
//!
//! Writing is off the critical path: the run loop hands each iteration's scalars and the
//! summaries its nodes emitted ([`Summary`]) to a writer thread through a bounded queue; PNG
//! encoding, histogram bucketing, protobuf encoding and the file writes happen there. A write
//! error is reported at the next iteration (naming the file), like the Parquet sink's.
//!
//! Resume: each part of a run writes a new file, named to sort after the files before it, that
//! starts with `SessionLog.START` at the first iteration it runs. TensorBoard's event
//! accumulator, on a START event at step S, purges every event at step >= S read so far, so the
//! superseded iterations of the earlier files disappear and the re-run ones take their place.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use prost::Message;

/// Name of the event file directory inside a run directory.
pub const DIR: &str = "tb";

/// Buckets of a histogram (equal widths between the smallest and largest value).
pub const HISTOGRAM_BUCKETS: usize = 30;

/// Something a node shows in TensorBoard besides its metrics (which are scalars already): its
/// tag is prefixed with the node's id like a metric's name.
#[derive(Debug, Clone, PartialEq)]
pub enum Summary {
    /// 8-bit pixels, row-major, `channels` (1: grey, 3: RGB, 4: RGBA) per pixel; encoded as PNG
    /// on the writer thread. `caption` is the summary's description.
    Image {
        tag: String,
        caption: String,
        width: u32,
        height: u32,
        channels: u8,
        pixels: Vec<u8>,
    },
    /// The distribution of `values` (non-finite values are left out).
    Histogram { tag: String, values: Vec<f64> },
    /// Markdown, shown by TensorBoard's text dashboard.
    Text { tag: String, text: String },
}

impl Summary {
    pub fn tag(&self) -> &str {
        match self {
            Summary::Image { tag, .. }
            | Summary::Histogram { tag, .. }
            | Summary::Text { tag, .. } => tag,
        }
    }
    /// Checks what a node may get wrong (a programming error in the node, reported as the
    /// node's failure, never a panic of the writer thread).
    pub fn check(&self) -> std::result::Result<(), String> {
        match self {
            Summary::Image {
                tag,
                width,
                height,
                channels,
                pixels,
                ..
            } => {
                if ![1, 3, 4].contains(channels) {
                    return Err(format!(
                        "image `{tag}`: {channels} channels (1, 3 or 4 are supported)"
                    ));
                }
                if *width == 0 || *height == 0 || *width > 1 << 15 || *height > 1 << 15 {
                    return Err(format!(
                        "image `{tag}`: {width}x{height} px (each side must be 1..=32768)"
                    ));
                }
                let want = *width as usize * *height as usize * *channels as usize;
                if pixels.len() != want {
                    return Err(format!(
                        "image `{tag}`: {} bytes of pixels, {width}x{height}x{channels} needs {want}",
                        pixels.len()
                    ));
                }
                Ok(())
            }
            Summary::Histogram { .. } | Summary::Text { .. } => Ok(()),
        }
    }
}

// --- The protobuf messages (field numbers from TensorBoard's event.proto, summary.proto,
// --- histogram.proto, tensor.proto and tensor_shape.proto).

#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    pub what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(SummaryProto),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

#[derive(Clone, PartialEq, Message)]
pub struct SessionLog {
    /// 1 = START.
    #[prost(int32, tag = "1")]
    pub status: i32,
    #[prost(string, tag = "3")]
    pub msg: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct SummaryProto {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
    #[prost(oneof = "ValueKind", tags = "2, 4, 5, 8")]
    pub value: Option<ValueKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ValueKind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(ImageProto),
    #[prost(message, tag = "5")]
    Histo(HistogramProto),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

#[derive(Clone, PartialEq, Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
    #[prost(string, tag = "2")]
    pub display_name: String,
    #[prost(string, tag = "3")]
    pub summary_description: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ImageProto {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct HistogramProto {
    #[prost(double, tag = "1")]
    pub min: f64,
    #[prost(double, tag = "2")]
    pub max: f64,
    #[prost(double, tag = "3")]
    pub num: f64,
    #[prost(double, tag = "4")]
    pub sum: f64,
    #[prost(double, tag = "5")]
    pub sum_squares: f64,
    #[prost(double, repeated, tag = "6")]
    pub bucket_limit: Vec<f64>,
    #[prost(double, repeated, tag = "7")]
    pub bucket: Vec<f64>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    /// 7 = DT_STRING.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Dim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

const SESSION_START: i32 = 1;
const DT_STRING: i32 = 7;

/// TFRecord's checksum: CRC32C, rotated right by 15 bits, plus a constant.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, payload, its masked CRC.
pub fn record(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc(payload).to_le_bytes());
    out
}

/// Seconds since the Unix epoch, as TensorBoard's `wall_time`.
pub fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The histogram of the finite `values` (None when there is none).
pub fn histogram(values: &[f64]) -> Option<HistogramProto> {
    let vals: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if vals.is_empty() {
        return None;
    }
    let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let n = if max > min { HISTOGRAM_BUCKETS } else { 1 };
    let width = (max - min) / n as f64;
    // Right edges; the last is `max` itself so that every value falls in a bucket.
    let bucket_limit: Vec<f64> = (1..=n)
        .map(|i| if i == n { max } else { min + width * i as f64 })
        .collect();
    let mut bucket = vec![0.0; n];
    for &v in &vals {
        let i = if width > 0.0 {
            (((v - min) / width) as usize).min(n - 1)
        } else {
            0
        };
        bucket[i] += 1.0;
    }
    Some(HistogramProto {
        min,
        max,
        num: vals.len() as f64,
        sum: vals.iter().sum(),
        sum_squares: vals.iter().map(|v| v * v).sum(),
        bucket_limit,
        bucket,
    })
}

fn png_bytes(width: u32, height: u32, channels: u8, pixels: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(match channels {
            1 => png::ColorType::Grayscale,
            4 => png::ColorType::Rgba,
            _ => png::ColorType::Rgb,
        });
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        w.write_image_data(pixels)?;
        w.finish()?;
    }
    Ok(out)
}

/// The protobuf value of one summary (None: a histogram of no finite value).
pub fn summary_value(s: &Summary) -> Result<Option<Value>> {
    s.check().map_err(|e| anyhow!(e))?;
    Ok(Some(match s {
        Summary::Image {
            tag,
            caption,
            width,
            height,
            channels,
            pixels,
        } => Value {
            tag: tag.clone(),
            // TensorBoard's images plugin (it migrates the legacy `image` value, keeping the
            // description, which its dashboard shows with the image).
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData {
                    plugin_name: "images".into(),
                    content: vec![],
                }),
                summary_description: caption.clone(),
                ..Default::default()
            }),
            value: Some(ValueKind::Image(ImageProto {
                height: *height as i32,
                width: *width as i32,
                colorspace: *channels as i32,
                encoded_image_string: png_bytes(*width, *height, *channels, pixels)?,
            })),
        },
        Summary::Histogram { tag, values } => {
            let Some(h) = histogram(values) else {
                return Ok(None);
            };
            Value {
                tag: tag.clone(),
                metadata: None,
                value: Some(ValueKind::Histo(h)),
            }
        }
        Summary::Text { tag, text } => Value {
            tag: tag.clone(),
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData {
                    plugin_name: "text".into(),
                    content: vec![],
                }),
                ..Default::default()
            }),
            value: Some(ValueKind::Tensor(TensorProto {
                dtype: DT_STRING,
                tensor_shape: Some(TensorShape {
                    dim: vec![Dim { size: 1 }],
                }),
                string_val: vec![text.as_bytes().to_vec()],
            })),
        },
    }))
}

/// The timestamp in an event file's name (`events.out.tfevents.<secs>.…`).
fn file_stamp(name: &str) -> Option<u64> {
    name.strip_prefix("events.out.tfevents.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// A new event file's path in `dir`: named after the current time, or one second after the
/// newest file already there, so that it sorts after every earlier part of the run (TensorBoard
/// reads a directory's event files in name order).
pub fn new_file_path(dir: &Path) -> PathBuf {
    let newest = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| file_stamp(&e.file_name().to_string_lossy()))
        .max();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stamp = newest.map_or(now, |n| now.max(n + 1));
    dir.join(format!(
        "events.out.tfevents.{stamp:010}.flowrun.{}.0",
        std::process::id()
    ))
}

/// An open event file (used by the writer thread; public for tests and tools).
pub struct EventFile {
    path: PathBuf,
    out: BufWriter<fs::File>,
}

impl EventFile {
    /// Create a new file in `dir` (created if needed) and write its `file_version` event.
    pub fn create(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| {
            format!("cannot create the TensorBoard directory {}", dir.display())
        })?;
        let path = new_file_path(dir);
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create TensorBoard event file {}", path.display()))?;
        let mut ef = EventFile {
            path,
            out: BufWriter::new(f),
        };
        ef.write(&Event {
            wall_time: now_s(),
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        Ok(ef)
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn write(&mut self, e: &Event) -> Result<()> {
        self.out
            .write_all(&record(&e.encode_to_vec()))
            .with_context(|| {
                format!(
                    "cannot write TensorBoard event file {}",
                    self.path.display()
                )
            })
    }
    /// `SessionLog.START` at `step`: TensorBoard drops what earlier files hold at steps >= it.
    pub fn start_session(&mut self, step: u64) -> Result<()> {
        self.write(&Event {
            wall_time: now_s(),
            step: step as i64,
            what: Some(What::SessionLog(SessionLog {
                status: SESSION_START,
                msg: format!("flowrun: run continues at iteration {step}"),
            })),
        })
    }
    pub fn summary(&mut self, step: u64, wall_time: f64, values: Vec<Value>) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.write(&Event {
            wall_time,
            step: step as i64,
            what: Some(What::Summary(SummaryProto { value: values })),
        })
    }
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().with_context(|| {
            format!(
                "cannot write TensorBoard event file {}",
                self.path.display()
            )
        })
    }
}

/// One iteration's worth of data for the writer thread.
pub struct Batch {
    pub step: u64,
    pub wall_time: f64,
    pub scalars: Vec<(String, f64)>,
    pub summaries: Vec<Summary>,
}

fn scalar(tag: &str, v: f64) -> Value {
    Value {
        tag: tag.to_string(),
        metadata: None,
        value: Some(ValueKind::SimpleValue(v as f32)),
    }
}

fn write_batch(file: &mut EventFile, b: Batch) -> Result<()> {
    let scalars = b.scalars.iter().map(|(k, v)| scalar(k, *v)).collect();
    file.summary(b.step, b.wall_time, scalars)?;
    // Images and histograms in events of their own: one large event per image keeps a reader
    // that samples by tag from holding every image of a step at once.
    for s in &b.summaries {
        let v = summary_value(s)
            .with_context(|| format!("summary `{}` at iteration {}", s.tag(), b.step))?;
        if let Some(v) = v {
            file.summary(b.step, b.wall_time, vec![v])?;
        }
    }
    file.flush()
}

/// The run's TensorBoard writer: a thread that owns the event file.
pub struct TbSink {
    tx: Option<SyncSender<Batch>>,
    thread: Option<JoinHandle<()>>,
    error: Arc<Mutex<Option<String>>>,
    path: PathBuf,
    /// Time the run loop spent handing batches over (the writer's cost on the critical path).
    pub queued_s: f64,
    /// Time the writer thread spent (encoding and writing), in milliseconds.
    written_ms: Arc<Mutex<f64>>,
    pub batches: u64,
}

impl TbSink {
    /// Open a new event file in `<run_dir>/tb/`, starting the session at `first_step` and
    /// writing `pipeline_text` as the text summary `pipeline`.
    pub fn start(run_dir: &Path, first_step: u64, pipeline_text: &str) -> Result<Self> {
        let mut file = EventFile::create(&run_dir.join(DIR))?;
        file.start_session(first_step)?;
        let text = Summary::Text {
            tag: "pipeline".into(),
            text: format!("```yaml\n{pipeline_text}\n```"),
        };
        if let Some(v) = summary_value(&text)? {
            file.summary(first_step, now_s(), vec![v])?;
        }
        file.flush()?;
        let path = file.path().to_path_buf();
        let (tx, rx) = sync_channel::<Batch>(16);
        let error = Arc::new(Mutex::new(None));
        let written_ms = Arc::new(Mutex::new(0.0));
        let (e2, w2) = (error.clone(), written_ms.clone());
        let thread = std::thread::Builder::new()
            .name("tensorboard".into())
            .spawn(move || writer_loop(file, rx, e2, w2))
            .context("cannot start the TensorBoard writer thread")?;
        Ok(TbSink {
            tx: Some(tx),
            thread: Some(thread),
            error,
            path,
            queued_s: 0.0,
            written_ms,
            batches: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn failed(&self) -> Option<String> {
        self.error.lock().ok().and_then(|g| g.clone())
    }

    /// Hand an iteration over (blocks only when the writer is 16 iterations behind). Fails with
    /// the writer's error, if it had one since.
    pub fn send(&mut self, b: Batch) -> Result<()> {
        let t0 = Instant::now();
        if let Some(e) = self.failed() {
            bail!("{e}");
        }
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| anyhow!("the TensorBoard writer was closed"))?;
        if tx.send(b).is_err() {
            bail!(
                "{}",
                self.failed()
                    .unwrap_or_else(|| "the TensorBoard writer thread stopped".into())
            );
        }
        self.batches += 1;
        self.queued_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Wait for everything queued to be written; returns the writer thread's time in seconds.
    pub fn finish(&mut self) -> Result<f64> {
        self.tx = None;
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            bail!("the TensorBoard writer thread panicked");
        }
        if let Some(e) = self.failed() {
            bail!("{e}");
        }
        Ok(self.written_ms.lock().map_or(0.0, |g| *g / 1e3))
    }
}

impl Drop for TbSink {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn writer_loop(
    mut file: EventFile,
    rx: Receiver<Batch>,
    error: Arc<Mutex<Option<String>>>,
    written_ms: Arc<Mutex<f64>>,
) {
    for b in rx {
        let t0 = Instant::now();
        let r = write_batch(&mut file, b);
        if let Ok(mut g) = written_ms.lock() {
            *g += t0.elapsed().as_secs_f64() * 1e3;
        }
        if let Err(e) = r {
            if let Ok(mut g) = error.lock() {
                *g = Some(format!("{e:#}"));
            }
            return;
        }
    }
}

/// The scalars of a metrics row, in the row's order (what `metrics.jsonl` holds but
/// `iteration`).
pub fn scalars_of(row: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
    row.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_frame_records_with_tfrecords_masked_crc32c() {
        // CRC32C("123456789") = 0xE3069283 (RFC 3720's check value), rotated right by 15
        // bits plus 0xa282ead8 (worked out by hand).
        assert_eq!(masked_crc(b"123456789"), 0xc78ab0e5);
        let r = record(b"abc");
        assert_eq!(r.len(), 3 + 16);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[8..12], &masked_crc(&3u64.to_le_bytes()).to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(&r[15..], &masked_crc(b"abc").to_le_bytes());
    }

    #[test]
    fn should_bucket_every_finite_value_and_leave_out_the_rest() {
        let h = histogram(&[0.0, 1.0, 2.0, 3.0, f64::NAN, f64::INFINITY]).unwrap();
        assert_eq!(h.num, 4.0);
        assert_eq!(h.bucket.iter().sum::<f64>(), 4.0);
        assert_eq!((h.min, h.max, h.sum, h.sum_squares), (0.0, 3.0, 6.0, 14.0));
        assert_eq!(h.bucket.len(), HISTOGRAM_BUCKETS);
        assert_eq!(*h.bucket_limit.last().unwrap(), 3.0);
        assert_eq!(
            h.bucket[HISTOGRAM_BUCKETS - 1],
            1.0,
            "the max is in the last bucket"
        );
        let one = histogram(&[0.5, 0.5]).unwrap();
        assert_eq!(
            (one.bucket.clone(), one.bucket_limit.clone()),
            (vec![2.0], vec![0.5])
        );
        assert!(histogram(&[f64::NAN]).is_none());
    }

    #[test]
    fn should_reject_an_image_whose_pixels_do_not_match_its_size() {
        let img = |channels, n| Summary::Image {
            tag: "x".into(),
            caption: String::new(),
            width: 2,
            height: 3,
            channels,
            pixels: vec![0; n],
        };
        assert!(img(3, 18).check().is_ok());
        let e = img(3, 17).check().unwrap_err();
        assert!(e.contains("image `x`") && e.contains("needs 18"), "{e}");
        assert!(img(2, 12).check().unwrap_err().contains("2 channels"));
    }

    #[test]
    fn should_name_a_new_file_after_every_earlier_one() {
        let dir = std::env::temp_dir().join(format!("flowrun-tb-names-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // A file from the future (a clock set back, or two parts of a run within a second).
        let later = "events.out.tfevents.9999999990.flowrun.1.0";
        fs::write(dir.join(later), b"").unwrap();
        let p = new_file_path(&dir);
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.as_str() > later, "{name}");
        assert_eq!(file_stamp(&name), Some(9_999_999_991));
        let _ = fs::remove_dir_all(dir);
    }
}
