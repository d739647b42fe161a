//! Thumbnails of PNG, JPEG, GIF and WebP images: which size answers a
//! request, and the decoding and encoding that makes it.
//!
//! Only a fixed set of sizes is ever made, so an image has at most
//! [`SIZES`]`.len()` thumbnails however many sizes clients ask for. An
//! image's dimensions are read from its header before anything is decoded,
//! and an image with more pixels than the configured limit is refused
//! there: a small file that would decode to gigabytes (a decompression
//! bomb) is never decoded. Pure functions; no storage.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader, Limits};

/// How a thumbnail fits its box.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// The whole image, shrunk to fit inside the box.
    Scale,
    /// The box filled: the image shrunk to cover it, its middle cut out.
    Crop,
}

impl Method {
    pub fn parse(text: &str) -> Option<Method> {
        match text {
            "scale" => Some(Method::Scale),
            "crop" => Some(Method::Crop),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Scale => "scale",
            Method::Crop => "crop",
        }
    }
}

/// A size thumbnails are made in: the box and how the image fits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Size {
    pub width: u32,
    pub height: u32,
    pub method: Method,
}

/// The sizes thumbnails are made in, the ones the Matrix specification
/// suggests (and Synapse makes by default).
pub const SIZES: [Size; 5] = [
    Size::new(32, 32, Method::Crop),
    Size::new(96, 96, Method::Crop),
    Size::new(320, 240, Method::Scale),
    Size::new(640, 480, Method::Scale),
    Size::new(800, 600, Method::Scale),
];

impl Size {
    const fn new(width: u32, height: u32, method: Method) -> Size {
        Size {
            width,
            height,
            method,
        }
    }
}

/// The size that answers a request for `width`×`height` by `method`: of
/// the sizes made by that method, the smallest at least as large as asked
/// in both directions, or else the largest.
pub fn choose(width: u32, height: u32, method: Method) -> Size {
    let same_method = || SIZES.iter().filter(|size| size.method == method);
    let area = |size: &&Size| u64::from(size.width) * u64::from(size.height);
    same_method()
        .filter(|size| size.width >= width && size.height >= height)
        .min_by_key(area)
        .or_else(|| same_method().max_by_key(area))
        .copied()
        .expect("every method has a size")
}

/// Why no thumbnail was made.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not an image this server thumbnails (a video, a document, a format
    /// it does not read), or an image that does not decode.
    NotAnImage(String),
    /// More pixels than the configured limit.
    TooManyPixels { width: u32, height: u32, limit: u64 },
}

/// A made thumbnail.
#[derive(Debug)]
pub struct Thumbnail {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
}

/// Makes the thumbnail of `original` at `size`. Never enlarges: an image
/// smaller than the box keeps its size (cropped to the box's shape for
/// `crop`). JPEG stays JPEG; everything else becomes PNG, which keeps
/// transparency. Of an animated GIF or WebP, the first frame.
pub fn make(original: &[u8], size: Size, max_pixels: u64) -> Result<Thumbnail, Refusal> {
    let reader = ImageReader::new(Cursor::new(original))
        .with_guessed_format()
        .map_err(|e| Refusal::NotAnImage(e.to_string()))?;
    let format = match reader.format() {
        Some(format @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif)) => format,
        Some(ImageFormat::WebP) => ImageFormat::WebP,
        Some(other) => {
            return Err(Refusal::NotAnImage(format!(
                "thumbnails are not made of {other:?} files"
            )))
        }
        None => {
            return Err(Refusal::NotAnImage(
                "the content is not a PNG, JPEG, GIF or WebP image".to_owned(),
            ))
        }
    };
    // The header alone, before any pixel is decoded.
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| Refusal::NotAnImage(format!("unreadable image header: {e}")))?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(Refusal::TooManyPixels {
            width,
            height,
            limit: max_pixels,
        });
    }
    let mut reader = ImageReader::with_format(Cursor::new(original), format);
    // The decoder holds to the dimensions just checked, and to memory for
    // at most that many pixels of the widest pixel type.
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    limits.max_alloc = Some(max_pixels.saturating_mul(16).max(16 << 20));
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|e| Refusal::NotAnImage(format!("the image does not decode: {e}")))?;
    let resized = resize(&image, size);
    encode(&resized, format == ImageFormat::Jpeg)
}

/// An image's width and height, from its header alone.
pub fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()
}

/// The image fitted to `size`, never enlarged.
fn resize(image: &DynamicImage, size: Size) -> DynamicImage {
    let (width, height) = (image.width(), image.height());
    let filter = image::imageops::FilterType::Triangle;
    match size.method {
        Method::Scale => {
            if width <= size.width && height <= size.height {
                return image.clone();
            }
            // `resize` keeps the aspect ratio inside the box.
            image.resize(size.width, size.height, filter)
        }
        Method::Crop => {
            if width >= size.width && height >= size.height {
                return image.resize_to_fill(size.width, size.height, filter);
            }
            // Smaller than the box in some direction: the middle cut to
            // the box's shape, at the image's own scale.
            let (box_w, box_h) = (u64::from(size.width), u64::from(size.height));
            let cut_w = u64::from(width)
                .min(u64::from(height) * box_w / box_h)
                .max(1);
            let cut_h = u64::from(height)
                .min(u64::from(width) * box_h / box_w)
                .max(1);
            let (cut_w, cut_h) = (cut_w as u32, cut_h as u32);
            image.crop_imm((width - cut_w) / 2, (height - cut_h) / 2, cut_w, cut_h)
        }
    }
}

fn encode(image: &DynamicImage, jpeg: bool) -> Result<Thumbnail, Refusal> {
    let mut bytes = Vec::new();
    let (format, content_type, image) = if jpeg {
        // JPEG has no alpha channel.
        let rgb = DynamicImage::ImageRgb8(image.to_rgb8());
        (ImageFormat::Jpeg, "image/jpeg", rgb)
    } else {
        (ImageFormat::Png, "image/png", image.clone())
    };
    image
        .write_to(&mut Cursor::new(&mut bytes), format)
        .map_err(|e| Refusal::NotAnImage(format!("the thumbnail does not encode: {e}")))?;
    Ok(Thumbnail {
        bytes,
        content_type,
        width: image.width(),
        height: image.height(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = image::RgbaImage::from_fn(width, height, |x, y| {
            image::Rgba([(x % 256) as u8, (y % 256) as u8, 128, 255])
        });
        let mut bytes = Vec::new();
        DynamicImage::ImageRgba8(image)
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        bytes
    }

    #[test]
    fn the_smallest_size_that_covers_the_request_answers_it() {
        let pick = |w, h, m| {
            let size = choose(w, h, m);
            (size.width, size.height, size.method)
        };
        assert_eq!(pick(1, 1, Method::Crop), (32, 32, Method::Crop));
        assert_eq!(pick(33, 20, Method::Crop), (96, 96, Method::Crop));
        assert_eq!(pick(500, 500, Method::Crop), (96, 96, Method::Crop));
        assert_eq!(pick(100, 100, Method::Scale), (320, 240, Method::Scale));
        assert_eq!(pick(320, 241, Method::Scale), (640, 480, Method::Scale));
        assert_eq!(pick(4000, 10, Method::Scale), (800, 600, Method::Scale));
    }

    #[test]
    fn scaling_keeps_the_shape_and_never_enlarges() {
        let wide = png(1000, 500);
        let made = make(&wide, choose(320, 240, Method::Scale), 1 << 25).unwrap();
        assert_eq!(
            (made.width, made.height, made.content_type),
            (320, 160, "image/png")
        );
        let small = png(100, 50);
        let made = make(&small, choose(800, 600, Method::Scale), 1 << 25).unwrap();
        assert_eq!((made.width, made.height), (100, 50));
    }

    #[test]
    fn cropping_fills_the_box_or_cuts_a_small_image_to_its_shape() {
        let made = make(&png(300, 200), choose(96, 96, Method::Crop), 1 << 25).unwrap();
        assert_eq!((made.width, made.height), (96, 96));
        let made = make(&png(60, 20), choose(96, 96, Method::Crop), 1 << 25).unwrap();
        assert_eq!((made.width, made.height), (20, 20));
    }

    #[test]
    fn images_over_the_pixel_limit_are_refused_before_decoding() {
        let refusal = make(&png(200, 100), SIZES[0], 10_000).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::TooManyPixels {
                width: 200,
                height: 100,
                limit: 10_000
            }
        );
    }

    #[test]
    fn other_content_is_not_an_image() {
        let mp4 = b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom".to_vec();
        assert!(matches!(
            make(&mp4, SIZES[0], 1 << 25),
            Err(Refusal::NotAnImage(_))
        ));
        let mut broken = png(50, 50);
        broken.truncate(60);
        assert!(matches!(
            make(&broken, SIZES[0], 1 << 25),
            Err(Refusal::NotAnImage(_))
        ));
    }
}
