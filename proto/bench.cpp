// Correctness harness + benchmark for lowbit_cpu.h.
//   g++ -O3 -march=x86-64-v3 -fopenmp -ffp-contract=off proto/bench.cpp -o proto/bench
//   proto/bench test            correctness (float64 reference), all bits/sparsity/batches/modes
//   proto/bench bench [reps]    4096x4096 tables (markdown); env COLD=1 flushes caches before each rep
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "lowbit_cpu.h"

using namespace lowbit;

struct Layer {  // owns a packed weight; `code` keeps the generator's codes (-1 = pruned) for the reference
  int64_t out, in;
  int bits;
  std::vector<float> cb, scale;
  std::vector<uint8_t> codes, bitmap;
  std::vector<int64_t> offs;
  std::vector<int> code;
  Packed view() const {
    Packed p;
    p.out = out, p.in = in, p.bits = bits, p.codebook = cb.data(), p.channel_scale = scale.data();
    p.codes = codes.data(), p.codes_bytes = int64_t(codes.size());
    if (!bitmap.empty()) p.keep_bitmap = bitmap.data(), p.code_offsets = offs.data();
    return p;
  }
  int64_t bytes() const { return int64_t(codes.size() + bitmap.size() + offs.size() * 8); }
};

Layer make_layer(int64_t out, int64_t in, int bits, double sparsity, bool uniform, std::mt19937_64& rng) {
  Layer L{out, in, bits};
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  const int n = 1 << bits;
  L.cb.resize(n);
  if (uniform) for (int k = 0; k < n; ++k) L.cb[k] = -0.5f + float(k) / float(n > 1 ? n - 1 : 1);
  else { for (auto& v : L.cb) v = U(rng); std::sort(L.cb.begin(), L.cb.end()); }
  L.scale.resize(out);
  for (auto& v : L.scale) v = 0.5f + 0.5f * (U(rng) + 1.f);
  const int64_t N = out * in;
  L.code.resize(N);
  std::uniform_real_distribution<double> P(0, 1);
  std::uniform_int_distribution<int> C(0, n - 1);
  int64_t kept = 0;
  for (auto& c : L.code) { c = (sparsity > 0 && P(rng) < sparsity) ? -1 : C(rng); kept += c >= 0; }
  L.codes.assign((kept * bits + 7) / 8, 0);
  if (sparsity > 0) { L.bitmap.assign((N + 7) / 8, 0); L.offs.assign((N + 63) / 64, 0); }
  int64_t k = 0;
  for (int64_t f = 0; f < N; ++f) {
    if (sparsity > 0 && f % 64 == 0) L.offs[f / 64] = k;
    if (L.code[f] < 0) continue;
    if (sparsity > 0) L.bitmap[f / 8] |= uint8_t(1u << (f % 8));
    for (int b = 0; b < bits; ++b)
      if ((L.code[f] >> b) & 1) L.codes[(k * bits + b) / 8] |= uint8_t(1u << ((k * bits + b) % 8));
    ++k;
  }
  return L;
}

// ------------------------------------------------------------------------------------------ test
int test() {
  std::mt19937_64 rng(17);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  const int64_t shapes[][2] = {{1, 1}, {3, 5}, {13, 37}, {7, 64}, {33, 129}, {17, 203}, {40, 256}, {9, 1000}};
  const double sps[] = {0, 0.3, 0.5, 0.75, 0.9};
  const int Ms[] = {1, 3, 16, 64};
  struct Mode { const char* name; Options o; };
  std::vector<Mode> modes;
  modes.push_back({"auto", {}});
  { Options o; o.tmac = false; modes.push_back({"no-tmac", o}); }
  { Options o; o.tmac = false; o.sparse = Sparse::Expand; o.lut = LutKind::Reg; modes.push_back({"expand+reg", o}); }
  { Options o; o.tmac = false; o.sparse = Sparse::Gather; o.lut = LutKind::Gather; modes.push_back({"gather+gather", o}); }
  { Options o; o.tmac = false; o.sparse = Sparse::Gather; o.lut = LutKind::Uniform; modes.push_back({"gather+uniform", o}); }
  long cases = 0, fails = 0;
  for (auto& sh : shapes)
    for (int bits = 1; bits <= 8; ++bits)
      for (double sp : sps)
        for (int uni = 0; uni < 2; ++uni) {
          Layer L = make_layer(sh[0], sh[1], bits, sp, uni, rng);
          const Packed w = L.view();
          for (int M : Ms) {
            std::vector<float> x(M * L.in);
            for (auto& v : x) v = U(rng);
            std::vector<double> ref(M * L.out), tol(M * L.out);
            for (int m = 0; m < M; ++m)
              for (int64_t c = 0; c < L.out; ++c) {
                double s = 0, a = 0;
                for (int64_t i = 0; i < L.in; ++i) {
                  const int k = L.code[c * L.in + i];
                  if (k < 0) continue;
                  const double p = double(L.scale[c]) * L.cb[k] * x[m * L.in + i];
                  s += p, a += std::fabs(p);
                }
                ref[m * L.out + c] = s, tol[m * L.out + c] = 1e-4 * (a + std::fabs(s));
              }
            for (auto& md : modes) {
              if (md.o.lut == LutKind::Uniform && !uni) continue;
              if (md.o.lut == LutKind::Reg && bits > 6) continue;
              std::vector<float> y1(M * L.out, NAN), y2(M * L.out, NAN);
              omp_set_num_threads(2);
              gemm(w, x.data(), M, y2.data(), md.o);
              omp_set_num_threads(1);
              gemm(w, x.data(), M, y1.data(), md.o);
              ++cases;
              bool ok = std::memcmp(y1.data(), y2.data(), y1.size() * 4) == 0;
              double worst = 0;
              for (size_t j = 0; j < ref.size(); ++j) {
                const double e = std::fabs(double(y2[j]) - ref[j]);
                if (!(e <= tol[j])) ok = false;
                worst = std::max(worst, e / (tol[j] + 1e-30));
              }
              if (!ok && fails++ < 20)
                std::printf("FAIL %s out=%ld in=%ld bits=%d sp=%.2f uni=%d M=%d worst err/tol=%.3g det=%d\n", md.name,
                            long(L.out), long(L.in), bits, sp, uni, M, worst,
                            int(std::memcmp(y1.data(), y2.data(), y1.size() * 4) == 0));
            }
          }
        }
  omp_set_num_threads(2);
  std::printf("correctness: %ld cases, %ld failures (tolerance 1e-4*(sum|x w| + |ref|), 1 vs 2 threads bitwise)\n",
              cases, fails);
  return fails != 0;
}

// ------------------------------------------------------------------------------------------ bench
static std::vector<float> flush_buf;
static bool cold = false, use_min = false;
template <class F>
double time_ms(F&& f, int reps) {
  std::vector<double> t;
  f();  // warm-up
  for (int r = 0; r < reps; ++r) {
    if (cold) {
      volatile float s = 0;
      for (size_t j = 0; j < flush_buf.size(); j += 16) flush_buf[j] += 1.f, s = s + flush_buf[j];
    }
    const auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return use_min ? t.front() : t[t.size() / 2];
}

int bench(int reps, bool uniform, const char* only) {
  const int threads = std::getenv("THREADS") ? std::atoi(std::getenv("THREADS")) : 2;
  omp_set_num_threads(threads);
  cold = std::getenv("COLD") != nullptr;
  use_min = std::getenv("STAT") && std::string(std::getenv("STAT")) == "min";
  if (cold) flush_buf.assign(size_t(96) << 18, 0.f);  // 96 MiB
  const int64_t O = 4096, I = 4096;
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  std::vector<float> W(O * I), x(64 * I), y(64 * O);
  for (auto& v : W) v = U(rng);
  for (auto& v : x) v = U(rng);
  const double sps[] = {0, 0.3, 0.5, 0.75, 0.9};
  std::vector<int> batches = {1, 16};
  if (std::getenv("BATCH")) batches = {std::atoi(std::getenv("BATCH"))};
  std::string mode = only ? only : "auto";
  Options o;
  if (mode == "expand") o.sparse = Sparse::Expand;
  if (mode == "gather") o.sparse = Sparse::Gather;
  if (mode == "notmac") o.tmac = false;
  if (mode == "reg5") o.lut = LutKind::Reg, o.tmac = false;
  if (mode == "glut") o.lut = LutKind::Gather, o.tmac = false;
  std::printf("\n### %s codebook, out=in=4096, %d threads, %s of %d%s, mode=%s\n", uniform ? "uniform (SBS)" : "non-uniform (OPQ)",
              threads, use_min ? "min" : "median", reps, cold ? ", caches flushed before each rep" : ", hot (weights may sit in the 32 MiB L3)", mode.c_str());
  for (int M : batches) {
    double t[9][5] = {};
    int64_t bytes[9][5] = {};
    std::vector<double> f32;
    for (int bits = 1; bits <= 8; ++bits) {
      f32.push_back(time_ms([&] { gemm_f32(W.data(), O, I, x.data(), M, y.data()); }, reps));
      for (int s = 0; s < 5; ++s) {
        Layer L = make_layer(O, I, bits, sps[s], uniform, rng);
        const Packed w = L.view();
        bytes[bits][s] = L.bytes();
        t[bits][s] = time_ms([&] { gemm(w, x.data(), M, y.data(), o); }, reps);
      }
    }
    std::sort(f32.begin(), f32.end());
    const double base = f32[f32.size() / 2];
    std::printf("\nbatch %d: own AVX2 fp32 = %.3f ms (median of 8 interleaved timings, range %.3f..%.3f)\n\n", M,
                base, f32.front(), f32.back());
    std::printf("| bits |");
    for (double sp : sps) std::printf(" %d%% ms | x fp32 |", int(sp * 100 + .5));
    std::printf("\n|---|");
    for (int s = 0; s < 5; ++s) std::printf("---|---|");
    std::printf("\n");
    for (int bits = 1; bits <= 8; ++bits) {
      std::printf("| %d |", bits);
      for (int s = 0; s < 5; ++s) std::printf(" %.3f | %.1f |", t[bits][s], base / t[bits][s]);
      std::printf("\n");
    }
    if (M == 1) {
      std::printf("\nbytes (MiB) of the bitmap layout (codes + bitmap + int64 offsets); fp32 = 64 MiB\n\n| bits |");
      for (double sp : sps) std::printf(" %d%% |", int(sp * 100 + .5));
      std::printf("\n|---|---|---|---|---|---|\n");
      for (int bits = 1; bits <= 8; ++bits) {
        std::printf("| %d |", bits);
        for (int s = 0; s < 5; ++s) std::printf(" %.2f |", bytes[bits][s] / 1048576.0);
        std::printf("\n");
      }
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "test";
  if (cmd == "test") return test();
  const int reps = argc > 2 ? std::atoi(argv[2]) : 15;
  const bool uniform = argc > 3 && std::string(argv[3]) == "uniform";
  return bench(reps, uniform, argc > 4 ? argv[4] : nullptr);
}
