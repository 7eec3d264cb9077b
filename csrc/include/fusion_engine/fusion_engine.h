/*
 * fusion_engine.h - the C API of libfusion_engine (C99 and C++ compatible).
 *
 * Three parts:
 *   1. merge ops on tensor views (fe_linear_merge, fe_task_arithmetic, fe_magnitude_mask,
 *      fe_ties_merge, fe_dare_merge, fe_fisher_merge): the kernels of fusion_engine.ops, on CPU
 *      buffers (always) or CUDA device buffers (when the library is built with CUDA);
 *   2. safetensors files: a zero-copy reader (fe_st_open ...) and an atomic writer
 *      (fe_st_writer_create ...);
 *   3. a load-time merger (fe_merger_create ...): a base checkpoint plus N adapters (full
 *      weights, task vectors or LoRA pairs) merged tensor by tensor into caller-owned buffers.
 *
 * Conventions
 *   - Every function that can fail returns an fe_status (FE_OK = 0) or, for getters that return
 *     a value, a sentinel (-1 or NULL); the reason is then in fe_last_error(), a message local to
 *     the calling thread. No C++ exception and no abort crosses this boundary.
 *   - Inputs are never modified. Outputs are written only through the `out` view.
 *   - Parameter structs come with fe_*_default_params(); passing NULL for a params pointer means
 *     the defaults. Per-model arrays (weights, densities) are optional: NULL means "the same value
 *     for every model" (1 for weights, `density` for densities).
 *   - Formulas and defaults are those of the Python ops (fusion_engine/ops/<op>.py), which are the
 *     spec; the same inputs give bit-identical results to fusion_engine's cpp backend.
 *   - Enum values are fixed: new values are only ever appended.
 */
#ifndef FUSION_ENGINE_H
#define FUSION_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && !defined(__MINGW32__)
#  ifdef FE_BUILD
#    define FE_API __declspec(dllexport)
#  else
#    define FE_API __declspec(dllimport)
#  endif
#else
#  define FE_API __attribute__((visibility("default")))
#endif

#define FE_VERSION_MAJOR 0
#define FE_VERSION_MINOR 1
#define FE_VERSION_PATCH 0

#define FE_MAX_DIMS 8       /* the largest rank of a tensor view */
#define FE_MAX_MODELS 65535 /* the most tensors (K) one merge takes */

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* Version, build, errors                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* "MAJOR.MINOR.PATCH" of the library actually loaded (compare with the FE_VERSION_* macros). */
FE_API const char* fe_version(void);

/* 1 if the library was built with the CUDA kernels (-DFUSION_ENGINE_CUDA=ON), else 0. */
FE_API int fe_has_cuda(void);

/* The SIMD code path the CPU kernels run on this machine: "avx512", "avx2" or "baseline". */
FE_API const char* fe_cpu_simd_level(void);

typedef enum fe_status {
    FE_OK                   = 0,
    FE_ERR_INVALID_ARGUMENT = 1,  /* NULL pointer, value out of range, K == 0, bad enum value   */
    FE_ERR_DTYPE_MISMATCH   = 2,  /* a dtype that is not allowed here or differs from another  */
    FE_ERR_SHAPE_MISMATCH   = 3,  /* shapes that must agree do not                             */
    FE_ERR_DEVICE_MISMATCH  = 4,  /* CPU and CUDA views mixed in one call                      */
    FE_ERR_UNSUPPORTED      = 5,  /* valid but not supported here (no CUDA build, f64 on CUDA) */
    FE_ERR_NONFINITE        = 6,  /* an input holds NaN/Inf and check_finite is set            */
    FE_ERR_NOT_FOUND        = 7,  /* no tensor (or metadata key) of that name                  */
    FE_ERR_IO               = 8,  /* a file could not be opened, mapped, written or renamed    */
    FE_ERR_FORMAT           = 9,  /* a malformed safetensors file or adapter                   */
    FE_ERR_OUT_OF_MEMORY    = 10,
    FE_ERR_CUDA             = 11, /* a CUDA runtime error (the message names it)               */
    FE_ERR_INTERNAL         = 12  /* a bug: please report the message                          */
} fe_status;

/* A static string naming the status ("FE_ERR_SHAPE_MISMATCH: shape mismatch"). */
FE_API const char* fe_status_string(fe_status status);

/* The message of the most recent failed call on this thread ("" if none): it names the
 * function, the tensor or parameter at fault and what to do. Successful calls leave it as it
 * is. The pointer stays valid until the next failing call on this thread. The message is
 * well-formed UTF-8: bytes of untrusted input it quotes that are not (and control characters)
 * appear as \xNN. */
FE_API const char* fe_last_error(void);

/* ------------------------------------------------------------------------------------------ */
/* Tensor views                                                                                */
/* ------------------------------------------------------------------------------------------ */

typedef enum fe_dtype {
    FE_DTYPE_F32     = 0,
    FE_DTYPE_F16     = 1,
    FE_DTYPE_BF16    = 2,
    FE_DTYPE_F64     = 3,
    /* storage-only dtypes (safetensors files, the magnitude mask); the merge ops take the four
     * floating dtypes above */
    FE_DTYPE_BOOL    = 4,  /* one byte, 0 or 1 */
    FE_DTYPE_U8      = 5,
    FE_DTYPE_I8      = 6,
    FE_DTYPE_I16     = 7,
    FE_DTYPE_U16     = 8,
    FE_DTYPE_I32     = 9,
    FE_DTYPE_U32     = 10,
    FE_DTYPE_I64     = 11,
    FE_DTYPE_U64     = 12,
    FE_DTYPE_F8_E4M3 = 13,
    FE_DTYPE_F8_E5M2 = 14
} fe_dtype;

/* Bytes per element (0 for an unknown value). */
FE_API size_t fe_dtype_size(fe_dtype dtype);

/* The safetensors name of a dtype ("F32", "BF16", ...; NULL for an unknown value). */
FE_API const char* fe_dtype_name(fe_dtype dtype);

typedef enum fe_device {
    FE_DEVICE_CPU  = 0,
    FE_DEVICE_CUDA = 1  /* device memory of the current CUDA device (cudaSetDevice) */
} fe_device;

/* A view of a tensor someone else owns.
 *
 * Element (i_0, ..., i_{ndim-1}) lives at data + (sum_d i_d * strides[d]) * fe_dtype_size(dtype)
 * bytes; strides == NULL means contiguous row-major. ndim == 0 is a scalar (one element).
 *
 * Non-contiguous or misaligned CPU views are accepted everywhere: inputs are gathered into a
 * temporary contiguous buffer and outputs computed into one and scattered back (extra memory:
 * one tensor per such view). Strides must be >= 0, and an output view must not map two
 * indices to one element. CUDA views must be contiguous and aligned to their element size
 * (FE_ERR_UNSUPPORTED otherwise).
 *
 * A CUDA op runs on the `stream` of its output view (a cudaStream_t; NULL: the legacy default
 * stream); the caller orders the inputs' producers before it. */
typedef struct fe_tensor_view {
    void*          data;               /* first element; may be NULL only when a dim is 0 */
    fe_dtype       dtype;
    int32_t        ndim;               /* 0 .. FE_MAX_DIMS */
    int64_t        shape[FE_MAX_DIMS]; /* ndim sizes, each >= 0 */
    const int64_t* strides;            /* ndim strides in elements, or NULL: contiguous */
    fe_device      device;
    void*          stream;             /* CUDA views: the cudaStream_t; ignored on CPU */
} fe_tensor_view;

/* A contiguous CPU view (strides NULL, stream NULL). ndim outside [0, FE_MAX_DIMS] gives a view
 * that every function rejects with FE_ERR_INVALID_ARGUMENT. */
FE_API fe_tensor_view fe_tensor_view_make(void* data, fe_dtype dtype, int32_t ndim, const int64_t* shape);

/* The number of elements of a view (1 for ndim == 0), or -1 (and fe_last_error) if its shape is
 * invalid: NULL, ndim out of range, a negative dim or stride, an unknown dtype or device, or a
 * byte size above INT64_MAX. `data` is not looked at. */
FE_API int64_t fe_tensor_view_numel(const fe_tensor_view* view);

/* ------------------------------------------------------------------------------------------ */
/* Merge ops                                                                                   */
/* ------------------------------------------------------------------------------------------ */
/*
 * Common rules. Inputs: K >= 1 (at most FE_MAX_MODELS) views of one floating dtype (F32, F16,
 * BF16, F64; F64 is CPU-only), one shape and one device; `out` has the same shape and device and
 * any floating dtype (the output dtype). Arithmetic is in fp32 (fp64 for F64 inputs). `out` must
 * not overlap an input. With check_finite (the default), an input holding NaN/Inf makes the call
 * return FE_ERR_NONFINITE naming it (the output is written anyway); without it, they propagate.
 * n_threads <= 0 uses OpenMP's default; results never depend on it. On CUDA, check_finite makes
 * the call wait for its stream; without it the call returns once the work is queued.
 */

/* How the sign is elected (TIES and DARE-TIES); FE_CONSENSUS_NONE: no election (plain sum). */
typedef enum fe_consensus {
    FE_CONSENSUS_NONE  = 0,
    FE_CONSENSUS_SUM   = 1,  /* s = sign(sum_i e_i)       (mergekit, PEFT "total")     */
    FE_CONSENSUS_COUNT = 2   /* s = sign(sum_i sign(e_i)) (PEFT "frequency")           */
} fe_consensus;

typedef enum fe_divisor {
    FE_DIVISOR_WEIGHTS = 0,  /* D = sum_i a_i w_i (mergekit) */
    FE_DIVISOR_COUNT   = 1   /* D = sum_i a_i     (PEFT)     */
} fe_divisor;

typedef enum fe_rescale {
    FE_RESCALE_NONE    = 0,
    FE_RESCALE_DENSITY = 1,  /* DARE: v_i / rho_i (the paper, PEFT)                           */
    FE_RESCALE_L1      = 2   /* ||delta_i||_1 / ||kept delta_i||_1 (mergekit's rescale: true) */
} fe_rescale;

typedef enum fe_tie {
    FE_TIE_INDEX     = 0,  /* keep exactly k: at the threshold, the lowest indices win */
    FE_TIE_THRESHOLD = 1   /* keep every |x| >= the k-th largest (TIES reference code)  */
} fe_tie;

/* Linear merge (model soups): y = sum_i c_i x_i, c_i = w_i / sum_j w_j (normalize) or w_i. */
typedef struct fe_linear_params {
    const double* weights;      /* K weights w_i, or NULL: all 1                          */
    bool          normalize;    /* default true; the weights must then not sum to 0       */
    bool          check_finite; /* default true                                           */
    int32_t       n_threads;    /* default 0                                              */
} fe_linear_params;

FE_API fe_linear_params fe_linear_default_params(void);
FE_API fe_status fe_linear_merge(const fe_tensor_view* tensors, int32_t n_tensors,
                                 const fe_linear_params* params, const fe_tensor_view* out);

/* Task arithmetic: y = b + lam * sum_i w_i delta_i, delta_i = dtype(x_i - b). */
typedef struct fe_task_arithmetic_params {
    const double* weights;      /* K weights, or NULL: all 1 */
    double        lam;          /* default 1                 */
    bool          check_finite;
    int32_t       n_threads;
} fe_task_arithmetic_params;

FE_API fe_task_arithmetic_params fe_task_arithmetic_default_params(void);
FE_API fe_status fe_task_arithmetic(const fe_tensor_view* base, const fe_tensor_view* tensors, int32_t n_tensors,
                                    const fe_task_arithmetic_params* params, const fe_tensor_view* out);

/* Magnitude mask: out[j] = 1 iff |x_j| is among the k = floor(density * n) largest (see fe_tie).
 * `out` has x's shape and dtype FE_DTYPE_BOOL. */
typedef struct fe_magnitude_mask_params {
    double  density;      /* rho in [0, 1], default 1 */
    fe_tie  tie;          /* default FE_TIE_INDEX      */
    bool    check_finite;
    int32_t n_threads;
} fe_magnitude_mask_params;

FE_API fe_magnitude_mask_params fe_magnitude_mask_default_params(void);
FE_API fe_status fe_magnitude_mask(const fe_tensor_view* x, const fe_magnitude_mask_params* params,
                                   const fe_tensor_view* out);

/* TIES (Yadav et al., 2023): delta_i = dtype(x_i - b), trimmed to its k_i = floor(rho_i n)
 * largest magnitudes (optionally L1-rescaled); e_i = w_i delta_i (sign_weighted) or delta_i;
 * s = elected sign; a_i = [sign(e_i) = s]; N = sum a_i w_i delta_i; D = sum a_i w_i or sum a_i
 * (0 -> 1); y = b + lam * (normalize ? N / D : N). mergekit "ties" = the defaults; PEFT "ties" =
 * base 0, sign_weighted false, FE_DIVISOR_COUNT. */
typedef struct fe_ties_params {
    const double* weights;       /* K weights, or NULL: all 1                               */
    double        density;       /* rho for every model, in [0, 1]; default 1               */
    const double* densities;     /* K per-model rho_i, or NULL: `density`                   */
    fe_consensus  consensus;     /* FE_CONSENSUS_SUM (default) or _COUNT (Python: sign=)    */
    bool          sign_weighted; /* default true (Python: sign_on="weighted")               */
    fe_divisor    divisor;       /* default FE_DIVISOR_WEIGHTS                              */
    bool          normalize;     /* default true                                            */
    double        lam;           /* default 1                                               */
    fe_rescale    rescale;       /* FE_RESCALE_NONE (default) or FE_RESCALE_L1              */
    fe_tie        tie;           /* default FE_TIE_INDEX                                    */
    bool          check_finite;
    int32_t       n_threads;
} fe_ties_params;

FE_API fe_ties_params fe_ties_default_params(void);
FE_API fe_status fe_ties_merge(const fe_tensor_view* base, const fe_tensor_view* tensors, int32_t n_tensors,
                               const fe_ties_params* params, const fe_tensor_view* out);

/* DARE (Yu et al., 2024): entry j of delta_i is kept iff u_ij < floor(rho_i 2^32), with u_ij the
 * Philox4x32-10 word of (seed, stream_id, model i, entry offset + j) - the masks of
 * fusion_engine.ops.dare_merge, bit for bit; kept entries are rescaled (1/rho_i, L1 or not) and
 * combined as in TIES (consensus) or summed (FE_CONSENSUS_NONE: y = b + lam * sum w_i v_i,
 * / sum w_i when normalize). Derive stream_id from the tensor name with fe_stream_id(). */
typedef struct fe_dare_params {
    const double* weights;       /* K weights, or NULL: all 1                     */
    double        density;       /* keep probability rho in [0, 1]; default 1     */
    const double* densities;     /* K per-model rho_i, or NULL: `density`         */
    uint64_t      seed;          /* default 0                                     */
    uint32_t      stream_id;     /* default 0; fe_stream_id(tensor name)          */
    int64_t       offset;        /* index of element 0 in the whole tensor (>= 0) */
    fe_consensus  consensus;     /* default FE_CONSENSUS_NONE                     */
    bool          sign_weighted; /* default true                                  */
    fe_divisor    divisor;       /* default FE_DIVISOR_WEIGHTS                    */
    fe_rescale    rescale;       /* default FE_RESCALE_DENSITY                    */
    bool          normalize;     /* default false                                 */
    double        lam;           /* default 1                                     */
    bool          check_finite;
    int32_t       n_threads;
} fe_dare_params;

FE_API fe_dare_params fe_dare_default_params(void);
FE_API fe_status fe_dare_merge(const fe_tensor_view* base, const fe_tensor_view* tensors, int32_t n_tensors,
                               const fe_dare_params* params, const fe_tensor_view* out);

/* The DARE stream id of a tensor name: FNV-1a 32-bit of its UTF-8 bytes
 * (fusion_engine.ops.philox.stream_id). NULL gives the FNV offset basis 0x811C9DC5. */
FE_API uint32_t fe_stream_id(const char* name);

/* Fisher-weighted averaging (Matena & Raffel, 2022): y = sum_i w_i F_i x_i / (sum_i w_i F_i + eps).
 * fishers[i] has the shape of tensors[i] and the tensors' dtype or F32. */
typedef struct fe_fisher_params {
    const double* weights;      /* K weights, or NULL: all 1 */
    double        eps;          /* >= 0, default 1e-8        */
    bool          check_finite;
    int32_t       n_threads;
} fe_fisher_params;

FE_API fe_fisher_params fe_fisher_default_params(void);
FE_API fe_status fe_fisher_merge(const fe_tensor_view* tensors, const fe_tensor_view* fishers, int32_t n_tensors,
                                 const fe_fisher_params* params, const fe_tensor_view* out);

/* ------------------------------------------------------------------------------------------ */
/* Safetensors reader                                                                          */
/* ------------------------------------------------------------------------------------------ */
/*
 * Files are untrusted: the header (at most 100 MB) must be strict JSON of the safetensors
 * subset; dtypes known; shapes of rank <= FE_MAX_DIMS whose byte size equals the data range;
 * data ranges tiling the data section exactly (no gap, no overlap, nothing after); tensor and
 * metadata names unique, valid UTF-8 without NUL. Anything else is FE_ERR_FORMAT, never a crash.
 * Tensors are listed in name order. Views point into a read-only memory map: do not write
 * through them; they live as long as the file handle.
 */
typedef struct fe_st_file fe_st_file;

FE_API fe_status fe_st_open(const char* path, fe_st_file** file);

/* The same from bytes in memory, without a copy: `data` must outlive the handle. */
FE_API fe_status fe_st_open_memory(const void* data, size_t size, fe_st_file** file);

FE_API void fe_st_close(fe_st_file* file); /* NULL is a no-op */

/* The number of tensors, or -1 if file is NULL. */
FE_API int64_t fe_st_tensor_count(const fe_st_file* file);

/* The name of tensor `index` (0 .. count-1), or NULL if out of range. */
FE_API const char* fe_st_tensor_name(const fe_st_file* file, int64_t index);

/* A view of tensor `index` / of the tensor called `name` (FE_ERR_NOT_FOUND if absent). */
FE_API fe_status fe_st_tensor_get(const fe_st_file* file, int64_t index, fe_tensor_view* view);
FE_API fe_status fe_st_find(const fe_st_file* file, const char* name, fe_tensor_view* view);

/* The "__metadata__" string map: count (-1 if file is NULL), keys by index (sorted), and the
 * value of a key (NULL if absent). */
FE_API int64_t fe_st_metadata_count(const fe_st_file* file);
FE_API const char* fe_st_metadata_key(const fe_st_file* file, int64_t index);
FE_API const char* fe_st_metadata_value(const fe_st_file* file, const char* key);

/* ------------------------------------------------------------------------------------------ */
/* Safetensors writer                                                                          */
/* ------------------------------------------------------------------------------------------ */
/*
 * Tensor data is copied out of each view when it is added (to a temporary spool file beside
 * `path`, so memory stays bounded); fe_st_writer_finish writes header + data to a temporary
 * sibling of `path`, syncs it and renames it over `path`: a crash leaves the old file or the
 * complete new one. Data is laid out like the safetensors package does (by dtype size, then
 * name), so every tensor is aligned to its element size in the file. Views may be strided, and
 * CUDA views are copied to the host when the library has CUDA.
 */
typedef struct fe_st_writer fe_st_writer;

FE_API fe_status fe_st_writer_create(const char* path, fe_st_writer** writer);

/* A "__metadata__" entry (e.g. "format" = "pt"); keys are unique. */
FE_API fe_status fe_st_writer_set_metadata(fe_st_writer* writer, const char* key, const char* value);

/* Adds a tensor (a copy of the view's data). A rejected tensor (bad view, duplicate name) leaves
 * the writer as it was; an I/O failure poisons it (finish then fails and cleans up). */
FE_API fe_status fe_st_writer_add(fe_st_writer* writer, const char* name, const fe_tensor_view* view);

/* Writes the file. Both functions free the writer, whatever the outcome (NULL: no-op for abort,
 * FE_ERR_INVALID_ARGUMENT for finish); abort leaves `path` untouched. */
FE_API fe_status fe_st_writer_finish(fe_st_writer* writer);
FE_API void fe_st_writer_abort(fe_st_writer* writer);

/* ------------------------------------------------------------------------------------------ */
/* Load-time merger                                                                            */
/* ------------------------------------------------------------------------------------------ */
/*
 * The base checkpoint defines the output tensors (names, shapes, dtypes). Adapter tensors are
 * matched to base tensors by name after removing the adapter's name_prefix:
 *   FE_ADAPTER_FULL:  fine-tuned weights x_i, same names and shapes as the base;
 *   FE_ADAPTER_DELTA: task vectors delta_i = x_i - b, same names and shapes as the base;
 *   FE_ADAPTER_LORA:  PEFT pairs "<module>.lora_A.weight" [r, in] and "<module>.lora_B.weight"
 *                     [out, r] for the base tensor "<module>.weight" [out, in];
 *                     delta_i = dtype(lora_scale * B A), accumulated in fp32.
 * Every adapter tensor must match a base tensor (FE_ERR_NOT_FOUND / _SHAPE_MISMATCH otherwise).
 * A base tensor no adapter touches is copied unchanged (converted to the output dtype); an
 * adapter that lacks a tensor others have contributes a zero task vector (x_i = b).
 *
 * Per tensor: when every adapter is FULL, the op runs on (b, x_1..x_K) directly - exactly
 * fusion_engine.ops.<op>(b, [x_i], ...). Otherwise each adapter's delta_i is formed in the
 * base dtype and y = out_dtype(b + y0), with y0 the op on (0, [delta_i]) in fp32 (fp64 for F64),
 * i.e. ops.<op>(zeros, deltas, out_dtype=float32) + b. LINEAR with deltas is b + sum c_i delta_i.
 * DARE uses stream_id = fe_stream_id(base tensor name) and model index i = adapter position.
 *
 * Extra memory per merged tensor: one tensor (base dtype) per adapter that is not a zero-copy
 * view of its file (deltas that need a dtype conversion, LoRA products, full weights when some
 * adapter is not full), plus one fp32 result when the output is a 16-bit dtype in delta mode.
 * With a CUDA output view, the inputs are uploaded to device scratch on the view's stream, the
 * CUDA kernels run there, and the call returns when the result is complete.
 * fe_merger_merge_tensor may run concurrently on one merger from several threads.
 */
typedef enum fe_adapter_kind {
    FE_ADAPTER_FULL  = 0,
    FE_ADAPTER_DELTA = 1,
    FE_ADAPTER_LORA  = 2
} fe_adapter_kind;

typedef struct fe_adapter {
    const char*     path;        /* a safetensors file                                        */
    fe_adapter_kind kind;
    double          weight;      /* w_i, default 1                                            */
    double          density;     /* rho_i for TIES and DARE, in [0, 1]; default 1             */
    double          lora_scale;  /* LoRA: delta = lora_scale * B A (PEFT: lora_alpha / r); 1  */
    const char*     name_prefix; /* stripped from adapter tensor names when present; NULL:
                                    "base_model.model." for LORA (PEFT), nothing otherwise     */
} fe_adapter;

/* {path, kind, weight 1, density 1, lora_scale 1, name_prefix NULL} */
FE_API fe_adapter fe_adapter_default(const char* path, fe_adapter_kind kind);

typedef enum fe_merge_method {
    FE_MERGE_LINEAR          = 0,
    FE_MERGE_TASK_ARITHMETIC = 1,
    FE_MERGE_TIES            = 2,
    FE_MERGE_DARE            = 3
} fe_merge_method;

/* The method's switches; fields a method does not use are ignored. */
typedef struct fe_merger_params {
    fe_merge_method method;
    double          lam;           /* TASK_ARITHMETIC, TIES, DARE; default 1                  */
    bool            normalize;     /* LINEAR and TIES default true, DARE false                */
    fe_consensus    consensus;     /* TIES: SUM (default) or COUNT; DARE: NONE (default) ...  */
    bool            sign_weighted; /* default true                                            */
    fe_divisor      divisor;       /* default FE_DIVISOR_WEIGHTS                              */
    fe_rescale      rescale;       /* TIES: NONE (default) or L1; DARE: DENSITY (default) ... */
    fe_tie          tie;           /* TIES; default FE_TIE_INDEX                              */
    uint64_t        seed;          /* DARE; default 0                                         */
    bool            check_finite;  /* default true                                            */
    int32_t         n_threads;     /* default 0                                               */
} fe_merger_params;

/* The defaults of `method` (those of the matching fe_*_default_params). */
FE_API fe_merger_params fe_merger_default_params(fe_merge_method method);

typedef struct fe_merger fe_merger;

/* Opens (maps) the base and the adapters and checks every adapter tensor against the base.
 * params NULL: fe_merger_default_params(FE_MERGE_TASK_ARITHMETIC). The adapters array and its
 * strings are copied; they need not outlive the call. */
FE_API fe_status fe_merger_create(const char* base_path, const fe_adapter* adapters, int32_t n_adapters,
                                  const fe_merger_params* params, fe_merger** merger);
FE_API void fe_merger_free(fe_merger* merger); /* NULL is a no-op */

/* The number of output tensors (those of the base), or -1 if merger is NULL. */
FE_API int64_t fe_merger_tensor_count(const fe_merger* merger);

typedef struct fe_tensor_info {
    const char* name;               /* lives as long as the merger  */
    fe_dtype    dtype;              /* the base tensor's dtype      */
    int32_t     ndim;
    int64_t     shape[FE_MAX_DIMS];
    int32_t     n_adapters;         /* adapters that touch it       */
} fe_tensor_info;

FE_API fe_status fe_merger_tensor_info(const fe_merger* merger, int64_t index, fe_tensor_info* info);
FE_API fe_status fe_merger_find(const fe_merger* merger, const char* name, int64_t* index);

/* The base file (for its metadata, or tensors to pass through); owned by the merger. */
FE_API const fe_st_file* fe_merger_base(const fe_merger* merger);

/* Merges tensor `index` into `out`: the base tensor's shape; any floating dtype for a floating
 * base tensor, the base dtype otherwise (copied); CPU, or CUDA in a CUDA build. */
FE_API fe_status fe_merger_merge_tensor(const fe_merger* merger, int64_t index, const fe_tensor_view* out);

#ifdef __cplusplus
}
#endif

#endif /* FUSION_ENGINE_H */
