//! CPU-heavy tasks on real bytes passed as base64: shrink a PPM image, deflate data, hash it;
//! and `media.resize`, a light step for canvas examples.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stem_guest::{TaskContext, TaskError};

fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, TaskError> {
    BASE64
        .decode(text)
        .map_err(|e| TaskError::reject(format!("`{field}` is not valid base64: {e}")))
}

#[derive(Deserialize)]
pub struct ThumbnailArgs {
    /// A binary PPM (P6, 8-bit RGB) image, base64-encoded.
    image: String,
    /// Longest side of the thumbnail in pixels.
    max_side: u32,
}

#[derive(Serialize)]
pub struct Thumbnail {
    width: u32,
    height: u32,
    /// The thumbnail as a P6 PPM, base64-encoded.
    image: String,
    sha256: String,
}

/// Shrinks a PPM image with a box filter so its longest side is `max_side`.
#[stem_guest::task(
    name = "media.thumbnail",
    queue = "media",
    time_limit = "60s",
    memory_limit = "256MiB",
    args_encoder = "gzip",
    result_encoder = "gzip"
)]
pub fn thumbnail(ctx: &TaskContext, args: ThumbnailArgs) -> Result<Thumbnail, TaskError> {
    if args.max_side == 0 {
        return Err(TaskError::reject("max_side must be at least 1"));
    }
    let bytes = decode_base64("image", &args.image)?;
    let image = Ppm::parse(&bytes).map_err(TaskError::reject)?;
    let scale = f64::from(args.max_side) / f64::from(image.width.max(image.height));
    let (width, height) = if scale >= 1.0 {
        (image.width, image.height)
    } else {
        (
            ((f64::from(image.width) * scale).round() as u32).max(1),
            ((f64::from(image.height) * scale).round() as u32).max(1),
        )
    };
    ctx.info(&format!(
        "{}x{} -> {width}x{height}",
        image.width, image.height
    ));
    let shrunk = image.box_resize(width, height);
    let encoded = shrunk.encode();
    Ok(Thumbnail {
        width,
        height,
        sha256: hex(&Sha256::digest(&encoded)),
        image: BASE64.encode(&encoded),
    })
}

#[derive(Deserialize)]
pub struct ResizeArgs {
    file: String,
    /// Target width in pixels (default 1024).
    #[serde(default = "default_width")]
    width: u32,
}

fn default_width() -> u32 {
    1024
}

#[derive(Serialize)]
pub struct Resized {
    file: String,
    output: String,
    width: u32,
}

/// Names the output of resizing `file` to `width` pixels, without reading any bytes.
#[stem_guest::task(name = "media.resize", queue = "media")]
pub fn resize(args: ResizeArgs) -> Result<Resized, TaskError> {
    if args.file.is_empty() {
        return Err(TaskError::reject("file must not be empty"));
    }
    if args.width == 0 {
        return Err(TaskError::reject("width must be at least 1"));
    }
    Ok(Resized {
        output: format!("resized/{}/{}", args.width, args.file),
        file: args.file,
        width: args.width,
    })
}

#[derive(Deserialize)]
pub struct CompressArgs {
    /// The bytes to compress, base64-encoded.
    data: String,
    /// zlib level 0-10 (default 6).
    #[serde(default = "default_level")]
    level: u8,
}

fn default_level() -> u8 {
    6
}

#[derive(Serialize)]
pub struct Compressed {
    original_bytes: usize,
    compressed_bytes: usize,
    /// The zlib stream, base64-encoded.
    data: String,
}

/// Compresses data with zlib (deflate) at the given level.
#[stem_guest::task(name = "media.compress", queue = "media")]
pub fn compress(args: CompressArgs) -> Result<Compressed, TaskError> {
    if args.level > 10 {
        return Err(TaskError::reject("level is 0 to 10"));
    }
    let data = decode_base64("data", &args.data)?;
    let compressed = miniz_oxide::deflate::compress_to_vec_zlib(&data, args.level);
    Ok(Compressed {
        original_bytes: data.len(),
        compressed_bytes: compressed.len(),
        data: BASE64.encode(&compressed),
    })
}

#[derive(Deserialize)]
pub struct DecompressArgs {
    data: String,
}

/// Inflates a zlib stream made by `media.compress`; returns the bytes base64-encoded.
#[stem_guest::task(name = "media.decompress", queue = "media", memory_limit = "256MiB")]
pub fn decompress(args: DecompressArgs) -> Result<String, TaskError> {
    let data = decode_base64("data", &args.data)?;
    let inflated = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(&data, 64 << 20)
        .map_err(|e| TaskError::reject(format!("not a zlib stream (or over 64MiB): {e:?}")))?;
    Ok(BASE64.encode(inflated))
}

#[derive(Deserialize)]
pub struct DigestArgs {
    data: String,
    /// Hash the digest again this many times (key stretching as CPU work); default 1.
    #[serde(default = "one")]
    rounds: u32,
}

fn one() -> u32 {
    1
}

/// The sha256 of the data (iterated `rounds` times), in hex.
#[stem_guest::task(name = "media.digest", queue = "media")]
pub fn digest(args: DigestArgs) -> Result<String, TaskError> {
    let data = decode_base64("data", &args.data)?;
    let mut digest = Sha256::digest(&data);
    for _ in 1..args.rounds.max(1) {
        digest = Sha256::digest(digest);
    }
    Ok(hex(&digest))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An 8-bit RGB image.
struct Ppm {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl Ppm {
    /// Parses a binary PPM: `P6`, width, height, maxval 255, then the raw pixels.
    fn parse(bytes: &[u8]) -> Result<Ppm, String> {
        let mut fields = Vec::with_capacity(4);
        let mut position = 0;
        while fields.len() < 4 {
            while position < bytes.len() && bytes[position].is_ascii_whitespace() {
                position += 1;
            }
            if bytes.get(position) == Some(&b'#') {
                while position < bytes.len() && bytes[position] != b'\n' {
                    position += 1;
                }
                continue;
            }
            let start = position;
            while position < bytes.len() && !bytes[position].is_ascii_whitespace() {
                position += 1;
            }
            if start == position {
                return Err("truncated PPM header".to_string());
            }
            fields.push(std::str::from_utf8(&bytes[start..position]).unwrap_or(""));
        }
        if fields[0] != "P6" {
            return Err("not a binary PPM (P6) image".to_string());
        }
        let number = |text: &str, what: &str| -> Result<u32, String> {
            text.parse()
                .map_err(|_| format!("invalid PPM {what}: `{text}`"))
        };
        let width = number(fields[1], "width")?;
        let height = number(fields[2], "height")?;
        if number(fields[3], "maxval")? != 255 {
            return Err("only 8-bit PPM images (maxval 255) are supported".to_string());
        }
        if width == 0 || height == 0 || u64::from(width) * u64::from(height) > 50_000_000 {
            return Err(format!("unsupported image size {width}x{height}"));
        }
        let pixels = &bytes[(position + 1).min(bytes.len())..];
        let expected = width as usize * height as usize * 3;
        if pixels.len() < expected {
            return Err(format!(
                "PPM pixel data is truncated: {} of {expected} bytes",
                pixels.len()
            ));
        }
        Ok(Ppm {
            width,
            height,
            pixels: pixels[..expected].to_vec(),
        })
    }

    /// Averages each destination pixel over the source pixels it covers.
    fn box_resize(&self, width: u32, height: u32) -> Ppm {
        let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
        for y in 0..height {
            let y0 = (u64::from(y) * u64::from(self.height) / u64::from(height)) as u32;
            let y1 =
                ((u64::from(y + 1) * u64::from(self.height)).div_ceil(u64::from(height))) as u32;
            for x in 0..width {
                let x0 = (u64::from(x) * u64::from(self.width) / u64::from(width)) as u32;
                let x1 =
                    ((u64::from(x + 1) * u64::from(self.width)).div_ceil(u64::from(width))) as u32;
                let mut sum = [0u64; 3];
                for sy in y0..y1 {
                    for sx in x0..x1 {
                        let at = (sy as usize * self.width as usize + sx as usize) * 3;
                        for (total, value) in sum.iter_mut().zip(&self.pixels[at..at + 3]) {
                            *total += u64::from(*value);
                        }
                    }
                }
                let count = u64::from((y1 - y0) * (x1 - x0)).max(1);
                pixels.extend(sum.iter().map(|s| (s / count) as u8));
            }
        }
        Ppm {
            width,
            height,
            pixels,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = format!("P6\n{} {}\n255\n", self.width, self.height).into_bytes();
        out.extend_from_slice(&self.pixels);
        out
    }
}
