/* ONNX Runtime custom-op library, domain ai.exaone.deploy:
 *   QMatMul / QMatMul2 / QMatMul3: the int4/int8 block-quantized product of qmatmul_core.h behind MatMulNBits'
 *     inputs (A, then B and scales per weight) and attributes (K, bits, block_size; N, or N0.. per weight);
 *   FMatMul: float32 A @ a constant float32 [K, N] of sgemm_core.h (ONNX MatMul's inputs).
 *
 * The runtime (kernels/__init__.py) compiles this file with the system C compiler, registers it through
 * SessionOptions.register_custom_ops_library and renames eligible nodes to these ops in memory: bundles on disk stay
 * standard ONNX that any onnxruntime (and onnxruntime-genai) runs.
 *
 * ABI: we declare only what we call. The C API is a table of function pointers whose order never changes (new
 * entries are appended; the slots below are those of onnxruntime_c_api.h), reached from OrtGetApiBase() ->
 * GetApi(version). OrtCustomOp is declared up to its version-16 members (CreateKernelV2 / KernelComputeV2); the
 * thread pool's ParallelFor needs API 17 (onnxruntime >= 1.17; the package requires >= 1.29). Rejected: vendoring
 * onnxruntime's headers (they are not in the Python wheel, and a copy is another file to keep in step) and a
 * C++/pybind11 extension built at install time (it would make the edge install need a compiler; here a missing
 * compiler only means ONNX Runtime's kernels keep running).
 */
#include "attention_core.h"
#include "qmatmul_core.h"
#include "sgemm_core.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

typedef void OrtStatus;
typedef void OrtKernelInfo;
typedef void OrtKernelContext;
typedef void OrtValue;
typedef void OrtTensorTypeAndShapeInfo;
typedef void OrtSessionOptions;
typedef void OrtCustomOpDomain;
typedef void OrtOpAttr;
typedef void OrtOp;
typedef void *const OrtApi; /* a table of function pointers, indexed by slot */

typedef struct {
    OrtApi *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

enum { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { T_FLOAT = 1, T_UINT8 = 2, T_INT8 = 3, T_INT32 = 6, T_INT64 = 7 };
enum { ATTR_INT = 1, ATTR_FLOAT = 3, ATTR_STRING = 5 }; /* OrtOpAttrType */

/* slots of the OrtApi table */
#define S_CreateStatus 0
#define S_CreateCustomOpDomain 26
#define S_CustomOpDomain_Add 27
#define S_AddCustomOpDomain 28
#define S_GetTensorMutableData 51
#define S_GetTensorElementType 60
#define S_GetDimensionsCount 61
#define S_GetDimensions 62
#define S_GetTensorShapeElementCount 64
#define S_GetTensorTypeAndShape 65
#define S_KernelInfoGetAttribute_float 85
#define S_KernelInfoGetAttribute_int64 86
#define S_KernelContext_GetInputCount 88
#define S_KernelContext_GetInput 90
#define S_KernelContext_GetOutput 91
#define S_ReleaseStatus 93
#define S_ReleaseTensorTypeAndShapeInfo 99
#define S_CreateOpAttr 211
#define S_ReleaseOpAttr 212
#define S_CreateOp 213
#define S_InvokeOp 214
#define S_ReleaseOp 215
#define S_KernelInfo_GetInputCount 230
#define S_KernelInfoGetConstantInput_tensor 249
#define S_KernelContext_ParallelFor 274
#define API_VERSION 17

static OrtApi *g_api;
#define FN(slot, type) ((type)(g_api[slot]))

typedef OrtStatus *(*CreateStatus_t)(int, const char *);
typedef OrtStatus *(*CreateCustomOpDomain_t)(const char *, OrtCustomOpDomain **);
typedef OrtStatus *(*CustomOpDomain_Add_t)(OrtCustomOpDomain *, const void *);
typedef OrtStatus *(*AddCustomOpDomain_t)(OrtSessionOptions *, OrtCustomOpDomain *);
typedef OrtStatus *(*GetTensorMutableData_t)(OrtValue *, void **);
typedef OrtStatus *(*GetDimensionsCount_t)(const OrtTensorTypeAndShapeInfo *, size_t *);
typedef OrtStatus *(*GetDimensions_t)(const OrtTensorTypeAndShapeInfo *, int64_t *, size_t);
typedef OrtStatus *(*GetTensorElementType_t)(const OrtTensorTypeAndShapeInfo *, int *);
typedef OrtStatus *(*GetTensorTypeAndShape_t)(const OrtValue *, OrtTensorTypeAndShapeInfo **);
typedef OrtStatus *(*KernelInfoGetAttribute_float_t)(const OrtKernelInfo *, const char *, float *);
typedef OrtStatus *(*KernelInfoGetAttribute_int64_t)(const OrtKernelInfo *, const char *, int64_t *);
typedef OrtStatus *(*KernelContext_GetInputCount_t)(const OrtKernelContext *, size_t *);
typedef OrtStatus *(*KernelContext_GetInput_t)(const OrtKernelContext *, size_t, const OrtValue **);
typedef OrtStatus *(*KernelContext_GetOutput_t)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **);
typedef void (*ReleaseStatus_t)(OrtStatus *);
typedef void (*ReleaseTensorTypeAndShapeInfo_t)(OrtTensorTypeAndShapeInfo *);
typedef OrtStatus *(*KernelInfo_GetInputCount_t)(const OrtKernelInfo *, size_t *);
typedef OrtStatus *(*KernelInfoGetConstantInput_tensor_t)(const OrtKernelInfo *, size_t, int *, const OrtValue **);
typedef OrtStatus *(*CreateOpAttr_t)(const char *, const void *, int, int, OrtOpAttr **);
typedef void (*ReleaseOpAttr_t)(OrtOpAttr *);
typedef OrtStatus *(*CreateOp_t)(const OrtKernelInfo *, const char *, const char *, int, const char **, const int *,
                                 int, const OrtOpAttr *const *, int, int, int, OrtOp **);
typedef OrtStatus *(*InvokeOp_t)(const OrtKernelContext *, const OrtOp *, const OrtValue *const *, int,
                                 OrtValue *const *, int);
typedef void (*ReleaseOp_t)(OrtOp *);
typedef OrtStatus *(*KernelContext_ParallelFor_t)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t,
                                                  void *);

/* OrtCustomOp, members up to version 16 */
typedef struct OrtCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *, OrtApi *, const OrtKernelInfo *);
    const char *(*GetName)(const struct OrtCustomOp *);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *);
    int (*GetInputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *);
    int (*GetOutputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *);
    void (*KernelCompute)(void *, OrtKernelContext *);
    void (*KernelDestroy)(void *);
    int (*GetInputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetInputMemoryType)(const struct OrtCustomOp *, size_t);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *);
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *, OrtApi *, const OrtKernelInfo *, void **);
    OrtStatus *(*KernelComputeV2)(void *, OrtKernelContext *);
} OrtCustomOp;

static OrtStatus *error(const char *fmt, int64_t a, int64_t b) {
    char msg[256];
    snprintf(msg, sizeof msg, fmt, (long long)a, (long long)b);
    return FN(S_CreateStatus, CreateStatus_t)(ORT_INVALID_ARGUMENT, msg);
}

#define CHECK(call)                                                                                                   \
    do {                                                                                                              \
        OrtStatus *st_ = (call);                                                                                      \
        if (st_) return st_;                                                                                          \
    } while (0)

#define MAX_PARTS 3

/* One node: 1-3 weights that read the same A (q/k/v, gate/up), packed back to back: one pass of A's quantization
 * and one parallel loop over all their panels, each panel writing its own output. */
typedef struct {
    int64_t k, kp; /* kp: K rounded up to the block */
    int bits, blk, parts;
    int64_t n[MAX_PARTS], panel0[MAX_PARTS + 1]; /* panel0[i]: first panel of weight i; panel0[parts]: total */
    uint8_t *packed;
} Kernel;

typedef struct {
    OrtCustomOp base; /* first: ORT hands callbacks a pointer to it */
    int parts;
    const char *name;
} Op;

/* v's dims (at most 8), rank and, when elem is not NULL, element type. */
static OrtStatus *typed_shape_of(const OrtValue *v, int64_t *dims, size_t *rank, int *elem) {
    OrtTensorTypeAndShapeInfo *info;
    CHECK(FN(S_GetTensorTypeAndShape, GetTensorTypeAndShape_t)(v, &info));
    OrtStatus *st = FN(S_GetDimensionsCount, GetDimensionsCount_t)(info, rank);
    if (!st && *rank > 8) st = error("QMatMul: rank %lld > %lld", (int64_t)*rank, 8);
    if (!st) st = FN(S_GetDimensions, GetDimensions_t)(info, dims, *rank);
    if (!st && elem) st = FN(S_GetTensorElementType, GetTensorElementType_t)(info, elem);
    FN(S_ReleaseTensorTypeAndShapeInfo, ReleaseTensorTypeAndShapeInfo_t)(info);
    return st;
}

static OrtStatus *shape_of(const OrtValue *v, int64_t *dims, size_t *rank) {
    return typed_shape_of(v, dims, rank, NULL);
}

static OrtStatus *constant_input_dims(const OrtKernelInfo *info, size_t index, const void **data, int64_t *count,
                                      int64_t *dims, size_t *rank_out) {
    int is_const = 0;
    const OrtValue *v = NULL;
    CHECK(FN(S_KernelInfoGetConstantInput_tensor, KernelInfoGetConstantInput_tensor_t)(info, index, &is_const, &v));
    if (!is_const || !v) return error("QMatMul: input %lld must be an initializer (%lld)", (int64_t)index, 0);
    size_t rank;
    CHECK(shape_of(v, dims, &rank));
    *rank_out = rank;
    *count = 1;
    for (size_t i = 0; i < rank; ++i) *count *= dims[i];
    return FN(S_GetTensorMutableData, GetTensorMutableData_t)((OrtValue *)v, (void **)data);
}

static OrtStatus *constant_input(const OrtKernelInfo *info, size_t index, const void **data, int64_t *count) {
    int64_t dims[8];
    size_t rank;
    return constant_input_dims(info, index, data, count, dims, &rank);
}

static void release_pages(const void *p, size_t bytes) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t lo = ((uintptr_t)p + page - 1) & ~(page - 1), hi = ((uintptr_t)p + bytes) & ~(page - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

static OrtStatus *attr(const OrtKernelInfo *info, const char *name, int64_t *out) {
    return FN(S_KernelInfoGetAttribute_int64, KernelInfoGetAttribute_int64_t)(info, name, out);
}

/* An int attribute, or ``fallback`` when the node has none. */
static int64_t attr_or(const OrtKernelInfo *info, const char *name, int64_t fallback) {
    int64_t v = fallback;
    OrtStatus *st = attr(info, name, &v);
    if (st) FN(S_ReleaseStatus, ReleaseStatus_t)(st), v = fallback;
    return v;
}

/* The renamer sets release_inputs when the node alone reads its weights: after packing, their pages go back to the
 * OS (file-backed ones would be re-read from the weights file if touched again, anonymous ones read as zeros;
 * nothing touches them again), so the weights are not resident twice. Absent: 0. */
static int64_t release_inputs(const OrtKernelInfo *info) { return attr_or(info, "release_inputs", 0); }

/* Input 0 (A, float32 [..., K]): its data, its shape (dims, rank) and its rows M = product of all but the last. */
static OrtStatus *input_rows(OrtKernelContext *ctx, const char *op, int64_t k, const float **a, int64_t *dims,
                             size_t *rank, int64_t *m) {
    const OrtValue *in;
    CHECK(FN(S_KernelContext_GetInput, KernelContext_GetInput_t)(ctx, 0, &in));
    CHECK(shape_of(in, dims, rank));
    if (*rank < 1 || dims[*rank - 1] != k) {
        char msg[96];
        snprintf(msg, sizeof msg, "%s: A's last dimension is %%lld, K is %%lld", op);
        return error(msg, *rank ? dims[*rank - 1] : 0, k);
    }
    *m = 1;
    for (size_t i = 0; i + 1 < *rank; ++i) *m *= dims[i];
    return FN(S_GetTensorMutableData, GetTensorMutableData_t)((OrtValue *)in, (void **)a);
}

/* Output i with A's shape but its last dimension n; its data. */
static OrtStatus *output(OrtKernelContext *ctx, size_t i, int64_t *dims, size_t rank, int64_t n, float **y) {
    OrtValue *v;
    dims[rank - 1] = n;
    CHECK(FN(S_KernelContext_GetOutput, KernelContext_GetOutput_t)(ctx, i, dims, rank, &v));
    return FN(S_GetTensorMutableData, GetTensorMutableData_t)(v, (void **)y);
}

static OrtStatus *create_kernel(const OrtCustomOp *op, OrtApi *api, const OrtKernelInfo *info, void **out) {
    (void)api;
    const int parts = ((const Op *)op)->parts;
    int64_t k, bits, block, n[MAX_PARTS];
    CHECK(attr(info, "K", &k));
    CHECK(attr(info, "bits", &bits));
    CHECK(attr(info, "block_size", &block));
    if ((bits != 4 && bits != 8) || (block != 32 && block != 64 && block != 128))
        return error("QMatMul: bits %lld block %lld unsupported", bits, block);
    const int64_t kp = k > 0 ? (k + block - 1) / block * block : 0;
    int64_t total = 0;
    for (int i = 0; i < parts; ++i) {
        static const char *names[MAX_PARTS] = {"N0", "N1", "N2"};
        CHECK(attr(info, parts == 1 ? "N" : names[i], &n[i]));
        if (k <= 0 || n[i] <= 0 || n[i] % QMM_PANEL || k > (1LL << 30) || n[i] > (1LL << 30))
            return error("QMatMul: K=%lld N=%lld unsupported", k, n[i]);
        total += qmm_packed_bytes(n[i], kp, (int)bits, (int)block);
    }
    Kernel *kern = calloc(1, sizeof(Kernel));
    if (!kern) return error("QMatMul: out of memory (%lld, %lld)", 0, 0);
    *kern = (Kernel){.k = k, .kp = kp, .bits = (int)bits, .blk = (int)block, .parts = parts};
    if (posix_memalign((void **)&kern->packed, 64, (size_t)total)) {
        free(kern);
        return error("QMatMul: out of memory packing %lld x %lld", k, total);
    }
    const int64_t release = release_inputs(info);
    OrtStatus *st = NULL;
    size_t offset = 0;
    for (int i = 0; i < parts; ++i) {
        const void *b, *s;
        int64_t nb_count, ns_count;
        st = constant_input(info, 1 + 2 * i, &b, &nb_count);
        if (!st) st = constant_input(info, 2 + 2 * i, &s, &ns_count);
        if (!st && (nb_count != n[i] * (kp / block) * (block * bits / 8) || ns_count != n[i] * (kp / block)))
            st = error("QMatMul: B has %lld bytes, scales %lld values: not MatMulNBits' layout", nb_count, ns_count);
        if (st) {
            free(kern->packed);
            free(kern);
            return st;
        }
        kern->n[i] = n[i];
        kern->panel0[i + 1] = kern->panel0[i] + n[i] / QMM_PANEL;
        qmm_pack((const uint8_t *)b, (const float *)s, n[i], kp, kern->bits, kern->blk, kern->packed + offset);
        offset += qmm_packed_bytes(n[i], kp, kern->bits, kern->blk);
        if (release) {
            release_pages(b, (size_t)nb_count);
            release_pages(s, (size_t)ns_count * sizeof(float));
        }
    }
    *out = kern;
    return NULL;
}

typedef struct {
    const Kernel *kern;
    const float *a;
    int8_t *qa;
    float *sa;
    int32_t *corr;
    float *y[MAX_PARTS];
    int64_t m, row_chunk, panels_per_task, tasks_per_chunk, task0[MAX_PARTS + 1];
} Work;

#define ROW_CHUNK 64

static void quantize_task(void *p, size_t i) {
    const Work *w = p;
    const int64_t m0 = (int64_t)i * w->row_chunk, m1 = m0 + w->row_chunk < w->m ? m0 + w->row_chunk : w->m;
    const Kernel *kn = w->kern;
    qmm_quantize_rows(w->a, m0, m1, kn->k, kn->kp, kn->bits, kn->blk, w->qa, w->sa, w->corr);
}

/* Task i: row chunk i / tasks_per_chunk, then (weight, panel group) in order. */
static void gemm_task(void *p, size_t i) {
    const Work *w = p;
    const Kernel *kn = w->kern;
    const int64_t nb = kn->kp / kn->blk;
    const int64_t rc = (int64_t)i / w->tasks_per_chunk, t = (int64_t)i % w->tasks_per_chunk;
    int part = 0;
    while (t >= w->task0[part + 1]) ++part;
    const int64_t panels = kn->n[part] / QMM_PANEL;
    const int64_t m0 = rc * w->row_chunk, m1 = m0 + w->row_chunk < w->m ? m0 + w->row_chunk : w->m;
    const int64_t p0 = (t - w->task0[part]) * w->panels_per_task;
    const int64_t p1 = p0 + w->panels_per_task < panels ? p0 + w->panels_per_task : panels;
    const uint8_t *packed = kn->packed + (size_t)kn->panel0[part] * (size_t)nb * qmm_block_bytes(kn->bits, kn->blk);
    qmm_panels(packed, w->qa + m0 * kn->kp, w->sa + m0 * nb, w->corr + m0 * nb, m1 - m0, kn->n[part], kn->kp,
               kn->bits, kn->blk, p0, p1, w->y[part] + m0 * kn->n[part]);
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
    const Kernel *kern = kernel;
    int64_t dims[8];
    size_t rank;
    Work w = {.kern = kern, .row_chunk = ROW_CHUNK};
    CHECK(input_rows(ctx, "QMatMul", kern->k, &w.a, dims, &rank, &w.m));
    const int64_t m = w.m;
    for (int i = 0; i < kern->parts; ++i) CHECK(output(ctx, (size_t)i, dims, rank, kern->n[i], &w.y[i]));
    if (m == 0) return NULL;
    const int64_t nb = kern->kp / kern->blk;
    void *scratch = malloc((size_t)m * kern->kp + (size_t)m * nb * (sizeof(float) + sizeof(int32_t)) + 64);
    if (!scratch) return error("QMatMul: out of memory for %lld rows of %lld", m, kern->k);
    w.sa = scratch;
    w.corr = (int32_t *)(w.sa + m * nb);
    w.qa = (int8_t *)(w.corr + m * nb);
    /* Work items: (row chunk, weight, group of panels). Decode of a few rows hands out single panels (the threads
     * claim them in turn, so both stream the weights at once; coarser chunks measured slower); batched decode
     * (5-32 rows) takes 32 panels, so that more panel pairs find their weights already fetched by the tiles of the
     * pair before them (qmm_tile's prefetch stays within a task; 32 panels measured 4-12% faster than 8 at 8-32
     * rows); prompts take 8 panels x 64 rows, a block of B and of A that stay in L2 while they meet. */
    w.panels_per_task = m <= 4 ? 1 : m <= 32 ? 32 : 8;
    for (int i = 0; i < kern->parts; ++i)
        w.task0[i + 1] = w.task0[i] + (kern->n[i] / QMM_PANEL + w.panels_per_task - 1) / w.panels_per_task;
    w.tasks_per_chunk = w.task0[kern->parts];
    const int64_t row_chunks = (m + ROW_CHUNK - 1) / ROW_CHUNK;
    KernelContext_ParallelFor_t parallel_for = FN(S_KernelContext_ParallelFor, KernelContext_ParallelFor_t);
    OrtStatus *st = NULL;
    if (row_chunks == 1)
        quantize_task(&w, 0); /* a few rows: waking the pool costs more than quantizing them */
    else
        st = parallel_for(ctx, quantize_task, (size_t)row_chunks, 0, &w);
    if (!st) st = parallel_for(ctx, gemm_task, (size_t)(row_chunks * w.tasks_per_chunk), 0, &w);
    free(scratch);
    return st;
}

static void destroy(void *kernel) {
    Kernel *kern = kernel;
    if (kern) free(kern->packed);
    free(kern);
}

static const char *op_name(const OrtCustomOp *op) { return ((const Op *)op)->name; }
static const char *op_ep(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
/* inputs: A, then (B, scales) per weight */
static int input_type(const OrtCustomOp *op, size_t i) { (void)op; return i % 2 ? T_UINT8 : T_FLOAT; }
static size_t input_count(const OrtCustomOp *op) { return 1 + 2 * (size_t)((const Op *)op)->parts; }
static int output_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return T_FLOAT; }
static size_t output_count(const OrtCustomOp *op) { return (size_t)((const Op *)op)->parts; }
static int required(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int mem_default(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int one(const OrtCustomOp *op) { (void)op; return 1; }

/* Version 16 with CreateKernelV2 / KernelComputeV2 set: onnxruntime calls those (errors reach the caller as a
 * status), never the version-1 CreateKernel / KernelCompute, left NULL. */
#define OP(PARTS, NAME)                                                                                              \
    {{16, NULL, op_name, op_ep, input_type, input_count, output_type, output_count, NULL, destroy,                 \
      required, required, mem_default, one, one, one, one, create_kernel, compute},                                   \
     PARTS,                                                                                                          \
     NAME}
static Op g_ops[MAX_PARTS] = {OP(1, "QMatMul"), OP(2, "QMatMul2"), OP(3, "QMatMul3")};

/* ---- FMatMul: float32 A @ constant float32 B [K, N] (sgemm_core.h) ---- */

typedef struct {
    int64_t k, n;
    float *packed;
} FKernel;

static OrtStatus *fcreate_kernel(const OrtCustomOp *op, OrtApi *api, const OrtKernelInfo *info, void **out) {
    (void)op;
    (void)api;
    const void *b;
    int64_t count, dims[8];
    size_t rank;
    CHECK(constant_input_dims(info, 1, &b, &count, dims, &rank));
    if (rank != 2 || dims[0] <= 0 || dims[1] <= 0 || dims[1] % 16)
        return error("FMatMul: B must be [K, N] with N %% 16 == 0 (rank %lld, N %lld)", (int64_t)rank,
                     rank == 2 ? dims[1] : 0);
    FKernel *kern = calloc(1, sizeof(FKernel));
    if (!kern) return error("FMatMul: out of memory (%lld, %lld)", 0, 0);
    kern->k = dims[0];
    kern->n = dims[1];
    if (posix_memalign((void **)&kern->packed, 64, (size_t)count * sizeof(float))) {
        free(kern);
        return error("FMatMul: out of memory packing %lld x %lld", dims[0], dims[1]);
    }
    sg_pack((const float *)b, kern->k, kern->n, kern->packed);
    if (release_inputs(info)) release_pages(b, (size_t)count * sizeof(float));
    *out = kern;
    return NULL;
}

typedef struct {
    const FKernel *kern;
    const float *a;
    float *y;
    int64_t m;
} FWork;

static void fgemm_task(void *p, size_t i) {
    const FWork *w = p;
    sg_panel(w->a, w->m, w->kern->k, w->kern->n, w->kern->packed, (int64_t)i, w->y, w->kern->n);
}

static OrtStatus *fcompute(void *kernel, OrtKernelContext *ctx) {
    const FKernel *kern = kernel;
    int64_t dims[8];
    size_t rank;
    FWork w = {.kern = kern};
    CHECK(input_rows(ctx, "FMatMul", kern->k, &w.a, dims, &rank, &w.m));
    CHECK(output(ctx, 0, dims, rank, kern->n, &w.y));
    if (w.m == 0) return NULL;
    /* One work item per 48-column panel over all rows: B is read from memory once whatever M (row chunks would
     * re-read it per chunk), and a panel's K block stays in L1 across the rows' tiles. */
    return FN(S_KernelContext_ParallelFor, KernelContext_ParallelFor_t)(ctx, fgemm_task, (size_t)sg_panels(kern->n), 0,
                                                                       &w);
}

static void fdestroy(void *kernel) {
    FKernel *kern = kernel;
    if (kern) free(kern->packed);
    free(kern);
}

static int finput_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return T_FLOAT; }
static size_t finput_count(const OrtCustomOp *op) { (void)op; return 2; }

static Op g_fop = {{16, NULL, op_name, op_ep, finput_type, finput_count, output_type, output_count, NULL, fdestroy,
                    required, required, mem_default, one, one, one, one, fcreate_kernel, fcompute},
                   1,
                   "FMatMul"};

/* ---- GroupQueryAttention (ai.exaone.deploy): decode steps on attention_core.h, the rest on ONNX Runtime's op ----
 *
 * The same inputs (query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache),
 * outputs and attributes as com.microsoft GroupQueryAttention (float32, the attributes the renamer allows). A step
 * with one new token per row whose present caches are its past caches (the runtime binds them to one buffer) and
 * whose positions lie inside the cache runs att_decode over (row, KV head) work items; anything else (prompts,
 * separate present buffers, a local window, softcap, smooth softmax, positions outside the buffer) is handed, with
 * the same inputs and outputs, to ONNX Runtime's own kernel, created once through the C API's standalone-op invoker
 * (CreateOp / InvokeOp). So prompts keep ONNX Runtime's GEMM-based attention, and every edge case keeps its exact
 * behaviour and error messages.
 * GroupQueryAttentionQ8: the same over an INT8 cache (k_quant_type = v_quant_type = PER_CHANNEL, kv_cache_bit_width
 * 8): fourteen inputs as the op's schema numbers them, past/present int8, position_ids / attention_bias / head_sink
 * (9-11) absent, k_scale / v_scale (12, 13) float [1, kv_heads, 1, head]; decode steps on att_decode with the
 * scales. */

#define GQA_INPUTS 9
#define GQA_Q8_INPUTS 14
#define GQA_OUTPUTS 3

typedef struct {
    int64_t heads, kv_heads, window, rotary, interleaved, smooth;
    float scale, softcap;
    int q8; /* GroupQueryAttentionQ8: int8 caches */
    OrtOp *inner;
} AKernel;

static float fattr_or(const OrtKernelInfo *info, const char *name, float fallback) {
    float v = fallback;
    OrtStatus *st = FN(S_KernelInfoGetAttribute_float, KernelInfoGetAttribute_float_t)(info, name, &v);
    if (st) FN(S_ReleaseStatus, ReleaseStatus_t)(st), v = fallback;
    return v;
}

/* ONNX Runtime's GroupQueryAttention kernel with this node's attributes and input count. The kernel lookup wants its
 * type constraints by name, which changed over releases: each known set is tried. */
static OrtStatus *create_inner(const OrtKernelInfo *info, AKernel *a) {
    size_t n_in = 0;
    CHECK(FN(S_KernelInfo_GetInputCount, KernelInfo_GetInputCount_t)(info, &n_in));
    const char *names[] = {"num_heads", "kv_num_heads", "local_window_size", "do_rotary", "rotary_interleaved",
                           "smooth_softmax", "kv_cache_bit_width", "scale", "softcap", "k_quant_type", "v_quant_type"};
    const int64_t ints[] = {a->heads, a->kv_heads, a->window, a->rotary, a->interleaved, a->smooth, 8};
    const float floats[] = {a->scale, a->softcap};
    static const char per_channel[] = "PER_CHANNEL";
    const int n_attrs = a->q8 ? 11 : 8; /* int8 caches: the bit width and quantization types too */
    OrtOpAttr *attrs[11] = {0};
    OrtStatus *st = NULL;
    for (int i = 0, j = 0; i < 11 && !st; ++i) {
        if (!a->q8 && (i == 6 || i >= 9)) continue;
        if (i < 7)
            st = FN(S_CreateOpAttr, CreateOpAttr_t)(names[i], &ints[i], 1, ATTR_INT, &attrs[j++]);
        else if (i < 9)
            st = FN(S_CreateOpAttr, CreateOpAttr_t)(names[i], &floats[i - 7], 1, ATTR_FLOAT, &attrs[j++]);
        else
            st = FN(S_CreateOpAttr, CreateOpAttr_t)(names[i], per_channel, (int)strlen(per_channel), ATTR_STRING,
                                                     &attrs[j++]);
    }
    /* the CPU kernel's type constraints over releases, newest first (an int8 cache exists in the newest only) */
    static const char *tc[3][4] = {{"T", "T_CACHE", "T_KV_SCALE", "M"}, {"T", "T_CACHE", "M"}, {"T", "M"}};
    static const int tv[3][4] = {{T_FLOAT, T_FLOAT, T_FLOAT, T_INT32}, {T_FLOAT, T_FLOAT, T_INT32}, {T_FLOAT, T_INT32}};
    static const int tv8[4] = {T_FLOAT, T_INT8, T_FLOAT, T_INT32};
    static const int tn[3] = {4, 3, 2};
    const int tries = a->q8 ? 1 : 3;
    for (int c = 0; c < tries && !st; ++c) {
        OrtStatus *tried = FN(S_CreateOp, CreateOp_t)(info, "GroupQueryAttention", "com.microsoft", 1, tc[c],
                                                       a->q8 ? tv8 : tv[c], tn[c], (const OrtOpAttr *const *)attrs,
                                                       n_attrs, (int)n_in, GQA_OUTPUTS, &a->inner);
        if (!tried) break;
        if (c < tries - 1)
            FN(S_ReleaseStatus, ReleaseStatus_t)(tried);
        else
            st = tried;
    }
    for (int i = 0; i < 11; ++i)
        if (attrs[i]) FN(S_ReleaseOpAttr, ReleaseOpAttr_t)(attrs[i]);
    return st;
}

static Op g_aop8;

static OrtStatus *acreate_kernel(const OrtCustomOp *op, OrtApi *api, const OrtKernelInfo *info, void **out) {
    (void)api;
    AKernel *a = calloc(1, sizeof(AKernel));
    if (!a) return error("GroupQueryAttention: out of memory (%lld, %lld)", 0, 0);
    a->heads = attr_or(info, "num_heads", 0);
    a->kv_heads = attr_or(info, "kv_num_heads", 0);
    a->window = attr_or(info, "local_window_size", -1);
    a->rotary = attr_or(info, "do_rotary", 0);
    a->interleaved = attr_or(info, "rotary_interleaved", 0);
    a->smooth = attr_or(info, "smooth_softmax", 0);
    a->scale = fattr_or(info, "scale", 0.f);
    a->softcap = fattr_or(info, "softcap", 0.f);
    a->q8 = op == &g_aop8.base;
    OrtStatus *st = NULL;
    if (a->heads <= 0 || a->kv_heads <= 0 || a->heads % a->kv_heads)
        st = error("GroupQueryAttention: num_heads %lld, kv_num_heads %lld", a->heads, a->kv_heads);
    if (!st) st = create_inner(info, a);
    if (st) {
        free(a);
        return st;
    }
    *out = a;
    return NULL;
}

typedef struct {
    const AttnShape *s;
    const float *q, *k, *v, *cos, *sin, *ks, *vs; /* ks, vs: int8 caches' scales (NULL: float caches) */
    void *kc, *vc;
    float *out;
    const int32_t *seqlens;
    int64_t items;
} AWork;

/* Work item i = (row, KV head). Each streams its own K and V rows from memory: while it computes, it prefetches the
 * next item's (into L2), so an item does not start with a wait on memory. */
static void attn_task(void *p, size_t i) {
    const AWork *w = p;
    const AttnShape *s = w->s;
    const int64_t b = (int64_t)i / s->kv_heads, kvh = (int64_t)i % s->kv_heads, pos = w->seqlens[b];
    const size_t es = w->ks ? 1 : sizeof(float), row_cache = (size_t)s->kv_heads * s->cap * s->head * es;
    const uint8_t *next_k = NULL, *next_v = NULL;
    int64_t next_n = 0;
    if ((int64_t)i + 1 < w->items) {
        const int64_t nb = ((int64_t)i + 1) / s->kv_heads, nh = ((int64_t)i + 1) % s->kv_heads;
        const size_t off = nb * row_cache + (size_t)nh * s->cap * s->head * es;
        next_k = (const uint8_t *)w->kc + off, next_v = (const uint8_t *)w->vc + off, next_n = w->seqlens[nb];
    }
    att_decode(w->q + b * s->heads * s->head, w->k + b * s->kv_heads * s->head, w->v + b * s->kv_heads * s->head,
               (uint8_t *)w->kc + b * row_cache, (uint8_t *)w->vc + b * row_cache, w->out + b * s->heads * s->head,
               s->rot_half ? w->cos + pos * s->rot_half : NULL, s->rot_half ? w->sin + pos * s->rot_half : NULL, pos,
               kvh, s, w->ks, w->vs, next_k, next_v, next_n);
}

static OrtStatus *data_of(const OrtValue *v, const void **p) {
    return FN(S_GetTensorMutableData, GetTensorMutableData_t)((OrtValue *)v, (void **)p);
}

static OrtStatus *acompute(void *kernel, OrtKernelContext *ctx) {
    const AKernel *a = kernel;
    size_t n_in = 0;
    CHECK(FN(S_KernelContext_GetInputCount, KernelContext_GetInputCount_t)(ctx, &n_in));
    if (a->q8 ? n_in != GQA_Q8_INPUTS : n_in != GQA_INPUTS && n_in != GQA_INPUTS - 2)
        return error("GroupQueryAttention: %lld inputs, expected %lld (or 7 without rotary caches)", (int64_t)n_in,
                     a->q8 ? GQA_Q8_INPUTS : GQA_INPUTS);
    const OrtValue *in[GQA_Q8_INPUTS] = {0};
    const void *ptr[GQA_Q8_INPUTS] = {0};
    int64_t dims[GQA_Q8_INPUTS][8] = {{0}};
    size_t rank[GQA_Q8_INPUTS] = {0};
    int elem[GQA_Q8_INPUTS] = {0};
    for (size_t i = 0; i < n_in; ++i) {
        CHECK(FN(S_KernelContext_GetInput, KernelContext_GetInput_t)(ctx, i, &in[i]));
        if (!in[i] && a->q8 && i >= 7 && i <= 11) continue; /* absent optional inputs (cos/sin on NoPE layers) */
        if (!in[i]) return error("GroupQueryAttention: input %lld is missing (%lld)", (int64_t)i, 0);
        CHECK(typed_shape_of(in[i], dims[i], &rank[i], &elem[i]));
        CHECK(data_of(in[i], &ptr[i]));
    }
    /* The outputs' shapes as ONNX Runtime's op sets them: output [B, S, num_heads * head], present caches
     * [B, kv_heads, max(total_sequence_length, past length), head]. */
    int64_t total_count = 1;
    for (size_t i = 0; i < rank[6]; ++i) total_count *= dims[6][i];
    if (rank[0] != 3 || rank[3] != 4 || rank[4] != 4 || dims[0][2] % a->heads || elem[5] != T_INT32 ||
        elem[6] != T_INT32)
        return error("GroupQueryAttention: query rank %lld, past rank %lld: not the op's layout", (int64_t)rank[0],
                     (int64_t)rank[3]);
    if (total_count != 1)
        return error("GroupQueryAttention: total_sequence_length has %lld elements, expected %lld", total_count, 1);
    const int32_t *seqlens = ptr[5];
    const int64_t batch = dims[0][0], seq = dims[0][1], head = dims[0][2] / a->heads, past = dims[3][2];
    const int64_t total = *(const int32_t *)ptr[6], present = total > past ? total : past;
    int64_t odims[3][4] = {{batch, seq, dims[0][2], 0}, {batch, a->kv_heads, present, head},
                           {batch, a->kv_heads, present, head}};
    OrtValue *outv[GQA_OUTPUTS];
    void *optr[GQA_OUTPUTS];
    for (size_t i = 0; i < GQA_OUTPUTS; ++i) {
        CHECK(FN(S_KernelContext_GetOutput, KernelContext_GetOutput_t)(ctx, i, odims[i], i ? 4 : 3, &outv[i]));
        CHECK(FN(S_GetTensorMutableData, GetTensorMutableData_t)(outv[i], &optr[i]));
    }

    AttnShape s = {.heads = a->heads, .kv_heads = a->kv_heads, .head = head, .cap = past,
                   .rot_half = a->rotary ? dims[7][1] : 0, .interleaved = (int)a->interleaved,
                   .scale = a->scale != 0.f ? a->scale : 1.f / sqrtf((float)head)};
    int fast = seq == 1 && present == past && optr[1] == ptr[3] && optr[2] == ptr[4] && a->window <= 0 &&
               a->softcap == 0.f && !a->smooth && head > 0 && head % 16 == 0 && head <= ATT_MAX_HEAD &&
               a->heads / a->kv_heads <= ATT_MAX_GROUP &&
               dims[1][2] == a->kv_heads * head && dims[2][2] == a->kv_heads * head && rank[1] == 3 && rank[2] == 3 &&
               dims[1][0] == batch && dims[2][0] == batch && dims[1][1] == 1 && dims[2][1] == 1 &&
               dims[3][0] == batch && dims[3][1] == a->kv_heads && dims[3][3] == head && rank[5] == 1 &&
               dims[5][0] == batch && dims[4][0] == batch && dims[4][1] == a->kv_heads && dims[4][2] == past &&
               dims[4][3] == head;
    for (int i = 0; i < 5; ++i) fast = fast && elem[i] == (i >= 3 && a->q8 ? T_INT8 : T_FLOAT);
    if (a->q8) /* no position ids, bias or sink; per-channel scales [1, kv_heads, 1, head] */
        for (int i = 9; i < 14; ++i)
            fast = fast && (i < 12 ? !in[i]
                                   : in[i] && elem[i] == T_FLOAT && rank[i] == 4 && dims[i][0] == 1 &&
                                         dims[i][1] == a->kv_heads && dims[i][2] == 1 && dims[i][3] == head);
    if (fast && a->rotary)
        fast = (a->q8 || n_in == GQA_INPUTS) && in[7] && in[8] && rank[7] == 2 && rank[8] == 2 &&
               dims[8][0] == dims[7][0] && dims[8][1] == dims[7][1] && 2 * dims[7][1] <= head && elem[7] == T_FLOAT &&
               elem[8] == T_FLOAT;
    /* ONNX Runtime's op treats a step whose total length equals its new tokens as a first prompt (position 0 for
     * every row): the fast path takes it only when every row starts at 0 there too. */
    for (int64_t b = 0; b < batch && fast; ++b)
        fast = seqlens[b] >= 0 && seqlens[b] < past && (!a->rotary || seqlens[b] < dims[7][0]) &&
               (total != 1 || seqlens[b] == 0);
    if (!fast)
        return FN(S_InvokeOp, InvokeOp_t)(ctx, a->inner, in, (int)n_in, (OrtValue *const *)outv, GQA_OUTPUTS);
    if (batch == 0) return NULL;
    AWork w = {.s = &s, .q = ptr[0], .k = ptr[1], .v = ptr[2], .cos = ptr[7], .sin = ptr[8],
               .ks = a->q8 ? ptr[12] : NULL, .vs = a->q8 ? ptr[13] : NULL,
               .kc = optr[1], .vc = optr[2], .out = optr[0], .seqlens = seqlens, .items = batch * a->kv_heads};
    return FN(S_KernelContext_ParallelFor, KernelContext_ParallelFor_t)(ctx, attn_task, (size_t)w.items, 0, &w);
}

static void adestroy(void *kernel) {
    AKernel *a = kernel;
    if (a && a->inner) FN(S_ReleaseOp, ReleaseOp_t)(a->inner);
    free(a);
}

/* query, key, value, past_key, past_value: float; seqlens_k, total_sequence_length: int32; cos, sin: float */
static int ainput_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 5 || i == 6 ? T_INT32 : T_FLOAT; }
static size_t ainput_count(const OrtCustomOp *op) { (void)op; return GQA_INPUTS; }
static int aoptional(const OrtCustomOp *op, size_t i) { (void)op; return i >= GQA_INPUTS - 2; } /* cos, sin */
static size_t aoutput_count(const OrtCustomOp *op) { (void)op; return GQA_OUTPUTS; }

static Op g_aop = {{16, NULL, op_name, op_ep, ainput_type, ainput_count, output_type, aoutput_count, NULL, adestroy,
                    aoptional, required, mem_default, one, one, one, one, acreate_kernel, acompute},
                   1,
                   "GroupQueryAttention"};

/* GroupQueryAttentionQ8: query, key, value float; past int8; seqlens, total int32; cos, sin float (absent on NoPE
 * layers); position_ids int64, attention_bias, head_sink float (absent); k_scale, v_scale float. Outputs: float,
 * int8, int8. */
static int ainput_type8(const OrtCustomOp *op, size_t i) {
    (void)op;
    return i == 3 || i == 4 ? T_INT8 : i == 5 || i == 6 ? T_INT32 : i == 9 ? T_INT64 : T_FLOAT;
}
static size_t ainput_count8(const OrtCustomOp *op) { (void)op; return GQA_Q8_INPUTS; }
static int aoptional8(const OrtCustomOp *op, size_t i) { (void)op; return i >= 7 && i <= 11; }
static int aoutput_type8(const OrtCustomOp *op, size_t i) { (void)op; return i ? T_INT8 : T_FLOAT; }

static Op g_aop8 = {{16, NULL, op_name, op_ep, ainput_type8, ainput_count8, aoutput_type8, aoutput_count, NULL,
                     adestroy, aoptional8, required, mem_default, one, one, one, one, acreate_kernel, acompute},
                    1,
                    "GroupQueryAttentionQ8"};

/* 1 when this CPU runs the kernel (the library is only registered then). */
int exaone_qmatmul_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
}

OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    g_api = base->GetApi(API_VERSION);
    if (!g_api) return NULL; /* an onnxruntime older than 1.17: cannot happen with the package's pin */
    OrtCustomOpDomain *domain;
    CHECK(FN(S_CreateCustomOpDomain, CreateCustomOpDomain_t)("ai.exaone.deploy", &domain));
    for (int i = 0; i < MAX_PARTS; ++i) CHECK(FN(S_CustomOpDomain_Add, CustomOpDomain_Add_t)(domain, &g_ops[i].base));
    CHECK(FN(S_CustomOpDomain_Add, CustomOpDomain_Add_t)(domain, &g_fop.base));
    CHECK(FN(S_CustomOpDomain_Add, CustomOpDomain_Add_t)(domain, &g_aop.base));
    CHECK(FN(S_CustomOpDomain_Add, CustomOpDomain_Add_t)(domain, &g_aop8.base));
    return FN(S_AddCustomOpDomain, AddCustomOpDomain_t)(options, domain);
}
