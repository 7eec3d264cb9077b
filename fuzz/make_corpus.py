"""Writes the seed corpus of the safetensors fuzzer (fuzz/corpus/): small valid files of every
dtype and feature, and malformed ones next to each check of the reader. The corpus is also the
shared list of verdicts of the two readers: tests run every file through the C reader
(tests/test_c_api.py) and the Python one (tests/io/test_safetensors_reader.py) and expect `valid_*`
and `package_*` files to open and `bad_*` files to be rejected by both. Standard library only
(plus files written by the `safetensors` package itself when it is importable).

    python fuzz/make_corpus.py            # rewrites fuzz/corpus/
"""

from __future__ import annotations

import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
         "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def raw(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def build(tensors: dict, metadata: dict | None = None, pad: bool = True) -> bytes:
    """tensors: name -> (dtype, shape); data is 0, 1, 2, ... in bytes, tensors packed in order."""
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape) in tensors.items():
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-(8 + len(text)) % 8)
    return raw(text, bytes(i % 251 for i in range(offset)))


def valid() -> dict[str, bytes]:
    return {
        "empty": build({}),
        "one_f32": build({"w": ("F32", [2, 3])}),
        "all_dtypes": build({f"t_{d.lower()}": (d, [3]) for d in SIZES}),
        "metadata": build({"w": ("BF16", [4])}, {"format": "pt", "note": "caf\u00e9 \"quoted\""}),
        "scalar_and_empty": build({"s": ("F64", []), "z": ("F16", [0, 7])}),
        "rank8": build({"r": ("U8", [1, 2, 1, 2, 1, 2, 1, 2])}),
        "unicode_names": build({"caf\u00e9.\U0001F600": ("I32", [1]), "tab\there": ("I8", [2])}),
        "unpadded": build({"w": ("F32", [1])}, pad=False),
        "whitespace": raw(b' { "w" : { "dtype" : "U8" , "shape" : [ 2 ] , "data_offsets" : [ 0 , 2 ] } } '[1:], b"ab"),
        "escapes": raw(rb'{"a\"b\\c\/d\u00e9\ud83d\ude00":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
        "empty_tensors_one_offset": build({"a": ("F32", [0]), "b": ("U8", [3, 0])}),
        "largest_dim": raw(b'{"z":{"dtype":"U8","shape":[0,9223372036854775807],"data_offsets":[0,0]}}'),
        "padding_newlines": raw(b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}\n\r\t ', b"x"),
        "lora": build({"base_model.model.q.lora_A.weight": ("F32", [2, 4]),
                       "base_model.model.q.lora_B.weight": ("F32", [4, 2])}, {"format": "pt"}),
    }


def malformed() -> dict[str, bytes]:
    t = b'"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    return {
        "short": b"\x05\x00\x00",
        "huge_length": raw(b"{}", length=200_000_000),
        "length_past_end": raw(b"{}", length=64),
        "not_object": raw(b"[]"),
        "trailing": raw(b"{" + t + b"}x", bytes(8)),
        "unknown_dtype": raw(b'{"t":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}}', bytes(8)),
        "negative_dim": raw(b'{"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', bytes(8)),
        "float_dim": raw(b'{"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', bytes(8)),
        "big_number": raw(b'{"t":{"dtype":"F32","shape":[184467440737095516160],"data_offsets":[0,8]}}', bytes(8)),
        "overflow": raw(b'{"t":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}', bytes(8)),
        "size_mismatch": raw(b'{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', bytes(8)),
        "overlap": raw(b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
                       b'"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}', bytes(6)),
        "gap": raw(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                   b'"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}', bytes(3)),
        "extra_data": raw(b"{" + t + b"}", bytes(9)),
        "past_end": raw(b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', bytes(8)),
        "duplicate_name": raw(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                              b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', bytes(2)),
        "metadata_number": raw(b'{"__metadata__":{"k":1}}'),
        "unknown_field": raw(b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}', bytes(8)),
        "missing_field": raw(b'{"t":{"dtype":"F32","shape":[2]}}', bytes(8)),
        "bad_utf8": raw(b'{"t\xff":{}}'),
        "surrogate": raw(rb'{"t\udc00":{}}'),
        "nul_escape": raw(rb'{"t\u0000":{}}'),
        "unterminated": raw(b'{"t'),
        "rank9": raw(b'{"t":{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,1]}}', b"x"),
        # the same rules, one class of input each (both readers must reject all of them)
        "empty_header": raw(b""),
        "leading_space": raw(b" {}"),
        "bom": raw(b"\xef\xbb\xbf{}"),
        "trailing_nul": raw(b"{}\x00"),
        "tensor_null": raw(b'{"t":null}'),
        "metadata_null": raw(b'{"__metadata__":null}'),
        "metadata_list": raw(b'{"__metadata__":[]}'),
        "metadata_key_twice": raw(b'{"__metadata__":{"k":"a","k":"b"}}'),
        "metadata_twice": raw(b'{"__metadata__":{},"__metadata__":{}}'),
        "metadata_nul_value": raw(rb'{"__metadata__":{"k":"a\u0000"}}'),
        "metadata_surrogate": raw(rb'{"__metadata__":{"k":"\udc00"}}'),
        "field_twice": raw(b'{"t":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
        "literal_dim": raw(b'{"t":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}}', b"x"),
        "nan_dim": raw(b'{"t":{"dtype":"U8","shape":[NaN],"data_offsets":[0,1]}}', b"x"),
        "negative_zero": raw(b'{"t":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}'),
        "exponent": raw(b'{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1e0]}}', b"x"),
        "leading_zero": raw(b'{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,01]}}', b"x"),
        "offset_2_63": raw(b'{"t":{"dtype":"U8","shape":[0],"data_offsets":[9223372036854775808,'
                           b'9223372036854775808]}}'),
        "shape_object": raw(b'{"t":{"dtype":"U8","shape":{},"data_offsets":[0,1]}}', b"x"),
        "three_offsets": raw(b'{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1,1]}}', b"x"),
        "end_before_begin": raw(b'{"t":{"dtype":"U8","shape":[0],"data_offsets":[1,0]}}', b"x"),
        "lowercase_dtype": raw(b'{"t":{"dtype":"u8","shape":[1],"data_offsets":[0,1]}}', b"x"),
        "empty_inside_other": raw(b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
                                  b'"b":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}}', bytes(4)),
        "gap_at_start": raw(b'{"t":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', bytes(2)),
        "high_surrogate_alone": raw(rb'{"t\ud800x":{}}'),
        "raw_control_char": raw(b'{"t\x01":{}}'),
        "overlong_utf8": raw(b'{"t\xc0\xaf":{}}'),
        "encoded_surrogate": raw(b'{"t\xed\xa0\x80":{}}'),
        "deep_nesting": raw(b'{"t":' + b"[" * 5000 + b"]" * 5000 + b"}"),
        "deep_metadata": raw(b'{"__metadata__":' + b'{"k":' * 5000 + b'"v"' + b"}" * 5000 + b"}"),
    }


def from_safetensors_package() -> dict[str, bytes]:
    try:
        import numpy as np
        from safetensors.numpy import save
    except ImportError:
        return {}
    return {
        "package_mixed": save({"b": np.arange(6, dtype=np.float32).reshape(2, 3),
                               "a": np.array([True, False, True]), "c": np.arange(3, dtype=np.int64)},
                              metadata={"format": "np"}),
    }


def main() -> None:
    shutil.rmtree(CORPUS, ignore_errors=True)
    os.makedirs(CORPUS)
    files = {**{f"valid_{k}": v for k, v in valid().items()},
             **{f"bad_{k}": v for k, v in malformed().items()},
             **from_safetensors_package()}
    for name, data in sorted(files.items()):
        with open(os.path.join(CORPUS, name + ".safetensors"), "wb") as f:
            f.write(data)
    print(f"wrote {len(files)} files to {CORPUS}")


if __name__ == "__main__":
    main()
