"""DICOM images (the Kaggle copy of ISIC 2020 ships `train/*.dcm`): read one, write one.

    payload = read_image("ISIC_0015719.dcm", max_pixels)   # JPEG bytes, or a PIL RGB image
    write_dicom(path, jpeg=jpeg_bytes, image_id="ISIC_0015719")   # what synth and tests write

Reading (`read_image`, called by `images.process_image` for a `.dcm` path or DICOM bytes):
- JPEG baseline / extended (8-bit) encapsulated pixel data, as in the Kaggle files
  (PhotometricInterpretation YBR_FULL_422): the frame's JPEG bytes are returned unchanged, so
  they go through exactly the decode + resize a `.jpg` goes through and a DICOM gives the same
  stored image (hence the same probabilities) as the JPEG it holds.
- The one ambiguous JPEG case: PhotometricInterpretation RGB on a codestream that does not say
  its colour space itself (no JFIF or Adobe marker, component ids not "R","G","B"), which
  libjpeg would read as YCbCr and wrongly transform: decoded without colour transform here.
- Every other transfer syntax (uncompressed, RLE, JPEG 2000, ...) is decoded by pydicom; its
  colour conversion (YBR_FULL / YBR_FULL_422 -> RGB, palette lookup) gives an RGB image.
  MONOCHROME1/2 become grey RGB; more than 8 bits are scaled to 8 (value * 255 / max).
- Refused with a `BadImage` naming the reason: not a DICOM file, no pixel data, several frames,
  more pixels than `max_pixels` (read from Rows x Columns before any pixel is decoded), a
  compression pydicom has no decoder for here.

pydicom is imported on first use, so importing this module (and `images`) stays light.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

DICOM_EXTENSIONS: tuple[str, ...] = (".dcm", ".dicom")
# VL Photographic Image Storage: what dermoscopy/camera images are stored as.
VL_PHOTOGRAPHIC_IMAGE = "1.2.840.10008.5.1.4.1.1.77.1.4"
_JPEG_SYNTAXES = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")  # baseline, extended
_PREAMBLE = 128


class DicomError(Exception):
    """A DICOM file that cannot give an image; `str(exc)` is the reason for the report.

    `images.process_image` turns it into its `BadImage`.
    """


def is_dicom(fp: Any) -> bool:
    """Whether `fp` is a DICOM input: a path named *.dcm / *.dicom, or bytes holding the DICOM
    preamble + "DICM" magic (open files are not sniffed)."""
    if isinstance(fp, str | os.PathLike):
        return os.fspath(fp).lower().endswith(DICOM_EXTENSIONS)
    if isinstance(fp, bytes | bytearray | memoryview):
        return bytes(fp[_PREAMBLE : _PREAMBLE + 4]) == b"DICM"
    return False


def _read(fp: str | os.PathLike | bytes | BinaryIO) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    if isinstance(fp, bytes | bytearray | memoryview):
        fp = io.BytesIO(bytes(fp))
    try:
        return pydicom.dcmread(fp)
    except InvalidDicomError as exc:
        raise DicomError(f"not a DICOM file ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on truncated files
        raise DicomError(f"corrupt DICOM file ({type(exc).__name__}: {exc})") from exc


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE})


def _says_colour_space(jpeg: bytes) -> bool:
    """Whether libjpeg can tell a JPEG codestream's colour space from the stream itself: a JFIF
    APP0 or Adobe APP14 segment, or frame components named "R", "G", "B" (libjpeg's own rules;
    otherwise it assumes YCbCr for 3 components)."""
    i = 2
    while i + 4 <= len(jpeg) and jpeg[i] == 0xFF:
        marker = jpeg[i + 1]
        if marker == 0xDA:  # start of scan: no more header segments
            return False
        length = int.from_bytes(jpeg[i + 2 : i + 4], "big")
        body = jpeg[i + 4 : i + 2 + length]
        if (marker == 0xE0 and body.startswith(b"JFIF")) or (
            marker == 0xEE and body.startswith(b"Adobe")
        ):
            return True
        if marker in _SOF_MARKERS and len(body) >= 15 and body[5] == 3:
            return bytes(body[6:15:3]) == b"RGB"
        i += 2 + length
    return False


def _decode_without_colour_transform(jpeg: bytes) -> Image.Image:
    """An RGB-sample JPEG that libjpeg would take for YCbCr: its samples, read as RGB."""
    try:
        with Image.open(io.BytesIO(jpeg), formats=("JPEG",)) as img:
            img.draft("YCbCr", img.size)  # the raw components, no YCbCr->RGB transform
            img.load()
            return Image.frombytes("RGB", img.size, img.tobytes())
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt streams
        raise DicomError(f"corrupt JPEG in DICOM ({type(exc).__name__}: {exc})") from exc


def _jpeg_frame(ds: Any) -> bytes | Image.Image:
    """The JPEG codestream of a single-frame JPEG-encapsulated dataset, or its decoded pixels in
    the ambiguous RGB case (see the module docstring)."""
    from pydicom.encaps import generate_frames

    frame = next(generate_frames(ds.PixelData, number_of_frames=1), b"")
    if not frame.startswith(b"\xff\xd8"):
        raise DicomError("encapsulated pixel data is not a JPEG codestream")
    # DICOM pads odd-length fragments to even length: drop the pad byte after the EOI marker,
    # so the bytes are exactly the JPEG that was encapsulated.
    if frame.endswith(b"\xff\xd9\x00"):
        frame = frame[:-1]
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    rgb = int(ds.get("SamplesPerPixel", 3)) == 3 and photometric == "RGB"
    if rgb and not _says_colour_space(frame):
        return _decode_without_colour_transform(frame)
    return frame


def _to_rgb_image(arr: np.ndarray, ds: Any) -> Image.Image:
    """pydicom's decoded array (RGB already for YBR / palette data) -> 8-bit RGB PIL image."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.dtype.itemsize > 1 else 8
    else:
        bits = int(ds.get("BitsStored", 8))
    arr = np.asarray(arr)
    if arr.dtype.kind == "i":  # signed samples: shift to unsigned
        arr = arr.astype(np.int64) - int(arr.min())
    if bits > 8 or arr.dtype.itemsize > 1:
        top = float(2 ** min(bits, 16) - 1)
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0 / top), 0, 255)
    arr = arr.astype(np.uint8)
    if photometric == "MONOCHROME1":  # 0 is white
        arr = 255 - arr
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    raise DicomError(f"unsupported pixel layout {arr.shape} ({photometric})")


def read_image(
    fp: str | os.PathLike | bytes | BinaryIO, max_pixels: int
) -> bytes | Image.Image:
    """The image of one DICOM file: JPEG bytes to decode as a `.jpg` is decoded, or an RGB PIL
    image when pydicom had to decode the pixels (module docstring).

    Raises:
      DicomError: with the reason, for a file that cannot give one image.
    """
    ds = _read(fp)
    if "PixelData" not in ds:
        raise DicomError("DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DicomError(f"multi-frame DICOM ({frames} frames): one image per file expected")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows < 1 or cols < 1:
        raise DicomError(f"empty DICOM image ({cols}x{rows})")
    if rows * cols > max_pixels:
        raise DicomError(
            f"decompression bomb: {cols}x{rows} = {rows * cols} px is over the limit of "
            f"{max_pixels} px"
        )
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax in _JPEG_SYNTAXES and int(ds.get("BitsStored", 8)) == 8:
        return _jpeg_frame(ds)
    from pydicom.pixels import pixel_array

    try:
        arr = pixel_array(ds)  # RGB for YBR data (pydicom >= 3 converts by default)
    except Exception as exc:  # noqa: BLE001 - missing decoder plugins, corrupt data, ...
        name = getattr(ds.file_meta.get("TransferSyntaxUID"), "name", syntax)
        raise DicomError(f"cannot decode DICOM pixel data ({name}: {exc})") from exc
    return _to_rgb_image(arr, ds)


# ----------------------------------------------------------------------------- writing


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=list(parts))  # deterministic for the same parts


def write_dicom(
    path: str | os.PathLike,
    *,
    jpeg: bytes | None = None,
    pixels: np.ndarray | None = None,
    photometric: str = "",
    image_id: str = "",
    tags: Mapping[str, str] | None = None,
) -> None:
    """Writes one single-frame DICOM file (VL Photographic Image), deterministically.

    Args:
      jpeg: JPEG bytes to encapsulate as they are (JPEG baseline transfer syntax); default
        photometric YBR_FULL_422, as in the Kaggle ISIC 2020 files.
      pixels: or uint8 RGB [H, W, 3] stored uncompressed (explicit VR little endian), converted
        to `photometric` ("RGB" (default) or "YBR_FULL").
      image_id: names the UIDs (the same id gives the same file) and PatientName.
      tags: more data elements by keyword (e.g. PatientID, PatientSex, PatientAge,
        BodyPartExamined); empty values are left out.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

    if (jpeg is None) == (pixels is None):
        raise ValueError("pass exactly one of jpeg= and pixels=")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = VL_PHOTOGRAPHIC_IMAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = _uid(image_id, "instance")
    ds.SOPClassUID = VL_PHOTOGRAPHIC_IMAGE
    ds.StudyInstanceUID = _uid(image_id, "study")
    ds.SeriesInstanceUID = _uid(image_id, "series")
    ds.Modality = "XC"  # external-camera photography
    ds.PatientName = image_id
    for keyword, value in (tags or {}).items():
        if value:
            setattr(ds, keyword, value)
    ds.SamplesPerPixel = 3
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PlanarConfiguration = 0
    if jpeg is not None:
        with Image.open(io.BytesIO(jpeg)) as img:
            if img.format != "JPEG" or img.mode != "RGB":
                raise ValueError(f"jpeg= must be an RGB JPEG, got {img.format} {img.mode}")
            ds.Columns, ds.Rows = img.size
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = photometric or "YBR_FULL_422"
        ds.LossyImageCompression = "01"
        ds.PixelData = encapsulate([jpeg])
        ds["PixelData"].VR = "OB"
    else:
        from pydicom.pixels import convert_color_space

        arr = np.ascontiguousarray(np.asarray(pixels, np.uint8))
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"pixels= must be uint8 [H, W, 3], got {arr.shape}")
        photometric = photometric or "RGB"
        if photometric == "YBR_FULL":
            arr = convert_color_space(arr, "RGB", "YBR_FULL")
        elif photometric != "RGB":
            raise ValueError(f"uncompressed pixels are RGB or YBR_FULL, not {photometric}")
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PhotometricInterpretation = photometric
        ds.Rows, ds.Columns = arr.shape[:2]
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OB"
    ds.save_as(os.fspath(path), enforce_file_format=True)
