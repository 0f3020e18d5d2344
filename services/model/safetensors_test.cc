#include "services/model/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr DType kAllDTypes[] = {
    DType::kF32, DType::kBF16, DType::kF16,  DType::kF64,    DType::kI64,
    DType::kI32, DType::kI16,  DType::kI8,   DType::kU64,    DType::kU32,
    DType::kU16, DType::kU8,   DType::kBool, DType::kF8E4M3, DType::kF8E5M2,
};

// u64 little-endian header length `n`, then `rest`.
std::string HeaderLength(uint64_t n, const std::string& rest) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + rest;
}

// A safetensors file image: header length, header, data.
std::string FileImage(const std::string& header, const std::string& data = "") {
  return HeaderLength(header.size(), header + data);
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// Deterministic, dtype-agnostic contents: byte i is (i·37 + seed) mod 256.
Tensor Patterned(DType dtype, std::vector<int64_t> shape, int seed) {
  Tensor t = Tensor::Empty(dtype, std::move(shape));
  auto* p = static_cast<uint8_t*>(t.mutable_raw());
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<uint8_t>(i * 37 + seed);
  return t;
}

// Checks the invariants ParseSafetensorsHeader promises for any header it accepts.
void ExpectInBounds(const SafetensorsHeader& h, size_t file_size) {
  ASSERT_LE(h.data_start, file_size);
  const uint64_t data_size = file_size - h.data_start;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const SafetensorsEntry& e : h.tensors) {
    ASSERT_LE(e.begin, e.end) << e.name;
    ASSERT_LE(e.end, data_size) << e.name;
    // Overflow-checked, except that a zero dimension makes any other harmless.
    for (int64_t d : e.shape) ASSERT_GE(d, 0) << e.name;
    const bool empty = std::find(e.shape.begin(), e.shape.end(), 0) != e.shape.end();
    uint64_t nbytes = empty ? 0 : DTypeSize(e.dtype);
    for (int64_t d : e.shape) {
      if (empty) break;
      ASSERT_FALSE(__builtin_mul_overflow(nbytes, static_cast<uint64_t>(d), &nbytes)) << e.name;
    }
    ASSERT_EQ(nbytes, e.end - e.begin) << e.name;
    ranges.emplace_back(e.begin, e.end);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    ASSERT_GE(ranges[i].first, ranges[i - 1].second) << "overlapping tensors";
  }
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) / "safetensors_test" / info->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

TEST_F(SafetensorsTest, RoundTripsEveryDTypeWithMetadata) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  int seed = 0;
  for (DType dtype : kAllDTypes) {
    tensors.emplace_back(std::string("t.") + DTypeName(dtype), Patterned(dtype, {2, 3}, ++seed));
  }
  tensors.emplace_back("scalar", Patterned(DType::kF64, {}, 7));
  tensors.emplace_back("empty.vector", Tensor::Empty(DType::kF32, {0}));
  tensors.emplace_back("empty.matrix", Tensor::Empty(DType::kBF16, {3, 0}));
  tensors.emplace_back("tail", Patterned(DType::kU8, {5}, 9));
  const std::map<std::string, std::string> metadata = {{"format", "pt"},
                                                       {"note", "a \"quoted\" é"}};
  const std::string path = Path("all.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, tensors, metadata).ok());
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const SafetensorsHeader& header = (*file)->header();
  EXPECT_EQ((*file)->path(), path);
  EXPECT_EQ(header.metadata, metadata);
  EXPECT_EQ(header.tensors.size(), tensors.size());
  // The writer pads the header so the data section starts 8-byte aligned.
  EXPECT_EQ(header.data_start % 8, 0u);
  ExpectInBounds(header, fs::file_size(path));

  uint64_t previous_end = 0;
  for (const auto& [name, want] : tensors) {
    SCOPED_TRACE(name);
    const SafetensorsEntry* entry = (*file)->Find(name);
    ASSERT_NE(entry, nullptr);
    // Data lies in the order the tensors were given, back to back.
    EXPECT_EQ(entry->begin, previous_end);
    previous_end = entry->end;
    absl::StatusOr<Tensor> got = (*file)->Get(name);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->dtype(), want.dtype());
    EXPECT_EQ(got->shape(), want.shape());
    ASSERT_EQ(got->nbytes(), want.nbytes());
    EXPECT_EQ(std::memcmp(got->raw(), want.raw(), want.nbytes()), 0);
  }
  EXPECT_EQ(previous_end, fs::file_size(path) - header.data_start);
}

TEST_F(SafetensorsTest, RoundTripsAFileWithNoTensors) {
  const std::string path = Path("none.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {}).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->header().tensors.empty());
  EXPECT_TRUE((*file)->header().metadata.empty());
}

TEST_F(SafetensorsTest, ViewsOutliveTheFile) {
  const std::string path = Path("a.safetensors");
  const Tensor want = Patterned(DType::kF32, {64, 64}, 3);
  ASSERT_TRUE(WriteSafetensors(path, {{"w", want}}).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<Tensor> view = (*file)->Get("w");
  ASSERT_TRUE(view.ok()) << view.status();
  file->reset();
  fs::remove(path);
  EXPECT_EQ(std::memcmp(view->raw(), want.raw(), want.nbytes()), 0);
}

TEST_F(SafetensorsTest, UnalignedTensorsConvert) {
  // Tensors sit back to back with no padding, so a 1-byte tensor leaves the next
  // one at an odd address; conversion must still read it correctly.
  Tensor f32 = Tensor::Empty(DType::kF32, {3});
  f32.mutable_data<float>()[0] = 1.5f;
  f32.mutable_data<float>()[1] = -3.0f;
  f32.mutable_data<float>()[2] = 0.125f;
  const std::string path = Path("unaligned.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"a", Patterned(DType::kU8, {1}, 0)},
                                      {"b", f32.FromF32(DType::kBF16).value()},
                                      {"c", f32.FromF32(DType::kF16).value()},
                                      {"d", f32.FromF32(DType::kF64).value()},
                                      {"e", f32}})
                  .ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  for (const char* name : {"b", "c", "d", "e"}) {
    SCOPED_TRACE(name);
    absl::StatusOr<Tensor> t = (*file)->Get(name);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_NE(reinterpret_cast<uintptr_t>(t->raw()) % 2, 0u);
    absl::StatusOr<Tensor> f = t->ToF32();
    ASSERT_TRUE(f.ok()) << f.status();
    for (int i = 0; i < 3; ++i) EXPECT_EQ(f->data<float>()[i], f32.data<float>()[i]);
  }
}

TEST_F(SafetensorsTest, GetOfAMissingTensorIsNotFoundNamingIt) {
  const std::string path = Path("a.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"present", Patterned(DType::kF32, {2}, 1)}}).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->Find("absent"), nullptr);
  absl::StatusOr<Tensor> t = (*file)->Get("absent");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(t.status().message(), HasSubstr(path));
  EXPECT_THAT(t.status().message(), HasSubstr("'absent'"));
}

TEST_F(SafetensorsTest, OpenOfAMissingFileIsNotFound) {
  const std::string path = Path("nope.safetensors");
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(file.status().message(), HasSubstr(path));
}

TEST_F(SafetensorsTest, OpenOfADirectoryFails) {
  const std::string path = Path("dir.safetensors");
  fs::create_directory(path);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(file.status().message(), HasSubstr(path));
}

TEST_F(SafetensorsTest, WriteRejectsDuplicateAndReservedNames) {
  const Tensor t = Patterned(DType::kF32, {2}, 1);
  const std::string path = Path("bad.safetensors");
  absl::Status dup = WriteSafetensors(path, {{"w", t}, {"w", t}});
  EXPECT_EQ(dup.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dup.message(), HasSubstr("'w'"));
  absl::Status reserved = WriteSafetensors(path, {{"__metadata__", t}});
  EXPECT_EQ(reserved.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(fs::exists(path));
}

TEST_F(SafetensorsTest, WriteRejectsAnUndefinedTensor) {
  const std::string path = Path("bad.safetensors");
  absl::Status s = WriteSafetensors(path, {{"ghost", Tensor()}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("'ghost'"));
  EXPECT_FALSE(fs::exists(path));
}

TEST_F(SafetensorsTest, WriteIntoAMissingDirectoryFails) {
  const std::string path = Path("no/such/dir/a.safetensors");
  absl::Status s = WriteSafetensors(path, {{"w", Patterned(DType::kF32, {2}, 1)}});
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr(path));
}

TEST_F(SafetensorsTest, HeaderLengthOverTheLimitIsRejected) {
  // A sparse file big enough to hold the claimed header, so only the limit stops it.
  const uint64_t n = kMaxSafetensorsHeaderBytes + 1;
  const std::string path = Path("huge_header.safetensors");
  WriteAll(path, HeaderLength(n, "{}"));
  fs::resize_file(path, 8 + n);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(file.status().message(), HasSubstr(path));
  EXPECT_THAT(file.status().message(), HasSubstr("exceeds the limit"));
}

// A hostile file: its bytes, the tensor the error must name ("" for none) and a
// fragment of the expected message.
struct HostileCase {
  const char* test_name;
  std::string bytes;
  const char* tensor;
  const char* message;
};

void PrintTo(const HostileCase& c, std::ostream* os) { *os << c.test_name; }

std::string Entry(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return "{\"dtype\":" + dtype + ",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

std::string OneTensor(const std::string& dtype, const std::string& shape,
                      const std::string& offsets, size_t data_bytes = 16) {
  return FileImage("{\"w\":" + Entry(dtype, shape, offsets) + "}", std::string(data_bytes, 'x'));
}

std::string DeeplyNested(int depth) {
  return std::string(depth, '[') + "0" + std::string(depth, ']');
}

std::vector<HostileCase> HostileCases() {
  const std::string f32 = "\"F32\"";
  return {
      {"EmptyFile", "", "", "shorter than the 8-byte header length"},
      {"ShorterThanEightBytes", std::string(5, '\x10'), "", "shorter than the 8-byte"},
      {"HeaderLengthPastTheEnd", HeaderLength(100, "{}"), "", "runs past the end"},
      {"HeaderLengthTwoToThe63", HeaderLength(uint64_t{1} << 63, "{}"), "", "runs past the end"},
      {"HeaderLengthAllOnes", HeaderLength(~uint64_t{0}, "{}"), "", "runs past the end"},
      {"HeaderNotJson", FileImage("{not json"), "", "not valid JSON"},
      {"HeaderTruncatedJson", FileImage("{\"w\":{\"dtype\":\"F3"), "", "not valid JSON"},
      {"HeaderIsAnArray", FileImage("[1,2]"), "", "not a JSON object"},
      {"HeaderIsAString", FileImage("\"x\""), "", "not a JSON object"},
      {"EntryNotObject", FileImage("{\"w\":[1]}"), "w", "entry is not an object"},
      {"MissingDtype", FileImage("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", "xxxx"), "w",
       "missing string dtype"},
      {"DtypeNotString", OneTensor("4", "[1]", "[0,4]"), "w", "missing string dtype"},
      {"UnknownDtype", OneTensor("\"F7\"", "[1]", "[0,4]"), "w", "unknown dtype 'F7'"},
      {"LowercaseDtype", OneTensor("\"f32\"", "[1]", "[0,4]"), "w", "unknown dtype 'f32'"},
      {"MissingShape", FileImage("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", "xxxx"), "w",
       "missing shape array"},
      {"ShapeNotArray", OneTensor(f32, "4", "[0,4]"), "w", "missing shape array"},
      {"ShapeNegative", OneTensor(f32, "[-1]", "[0,4]"), "w", "negative or non-integer"},
      {"ShapeString", OneTensor(f32, "[\"1\"]", "[0,4]"), "w", "negative or non-integer"},
      {"ShapeFloat", OneTensor(f32, "[1.5]", "[0,4]"), "w", "negative or non-integer"},
      {"ShapeIntegralFloat", OneTensor(f32, "[1.0]", "[0,4]"), "w", "negative or non-integer"},
      {"ShapeBool", OneTensor(f32, "[true]", "[0,4]"), "w", "negative or non-integer"},
      {"ShapeNested", OneTensor(f32, "[[1]]", "[0,4]"), "w", "negative or non-integer"},
      {"ShapeAboveInt64", OneTensor(f32, "[9223372036854775808]", "[0,4]"), "w",
       "negative or non-integer"},
      {"ShapeProductOverflowsUint64", OneTensor(f32, "[4294967296,4294967296,16]", "[0,16]"), "w",
       "more than the file's"},
      // (2^62 + 1)·4 wraps to 4 in 64 bits, which would match the offsets.
      {"ShapeBytesWrapToTheOffsets", OneTensor(f32, "[4611686018427387905]", "[0,4]"), "w",
       "more than the file's"},
      {"ShapeBytesWrapWithZeroData", OneTensor(f32, "[4611686018427387904]", "[0,0]", 0), "w",
       "more than the file's"},
      {"OffsetsMissing", FileImage("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", "xxxx"), "w",
       "data_offsets must be [begin, end]"},
      {"OffsetsNotArray", OneTensor(f32, "[1]", "4"), "w", "data_offsets must be [begin, end]"},
      {"OffsetsOneElement", OneTensor(f32, "[1]", "[4]"), "w", "data_offsets must be [begin, end]"},
      {"OffsetsThreeElements", OneTensor(f32, "[1]", "[0,4,8]"), "w",
       "data_offsets must be [begin, end]"},
      {"OffsetsNegative", OneTensor(f32, "[1]", "[-4,0]"), "w", "fall outside the data section"},
      {"OffsetsString", OneTensor(f32, "[1]", "[\"0\",\"4\"]"), "w",
       "data_offsets must be integers"},
      {"OffsetsFloat", OneTensor(f32, "[1]", "[0,4.0]"), "w", "data_offsets must be integers"},
      {"OffsetsDeeplyNested", OneTensor(f32, "[1]", "[" + DeeplyNested(200000) + ",4]"), "w",
       "data_offsets must be integers"},
      {"OffsetsReversed", OneTensor(f32, "[1]", "[8,4]"), "w", "are reversed"},
      {"OffsetsPastTheData", OneTensor(f32, "[100]", "[0,400]"), "w", "fall outside"},
      {"OffsetsEndOneTooFar", OneTensor(f32, "[1]", "[13,17]"), "w", "fall outside"},
      {"OffsetsHuge", OneTensor(f32, "[1]", "[18446744073709551612,18446744073709551615]"), "w",
       "fall outside"},
      {"ByteCountTooSmall", OneTensor(f32, "[2]", "[0,4]"), "w",
       "needs 8 bytes but data_offsets give 4"},
      {"ByteCountTooLarge", OneTensor("\"BF16\"", "[2,2]", "[0,12]"), "w",
       "needs 8 bytes but data_offsets give 12"},
      {"EmptyShapeWithBytes", OneTensor(f32, "[0]", "[0,4]"), "w", "needs 0 bytes"},
      {"Overlap",
       FileImage(
           "{\"a\":" + Entry(f32, "[2]", "[0,8]") + ",\"b\":" + Entry(f32, "[2]", "[4,12]") + "}",
           std::string(12, 'x')),
       "b", "overlap tensor 'a'"},
      {"OverlapNested",
       FileImage("{\"a\":" + Entry(f32, "[4]", "[0,16]") + ",\"b\":" + Entry(f32, "[1]", "[4,8]") +
                     ",\"c\":" + Entry(f32, "[1]", "[16,20]") + "}",
                 std::string(20, 'x')),
       "b", "overlap tensor 'a'"},
      {"SameRangeTwice",
       FileImage(
           "{\"a\":" + Entry(f32, "[1]", "[0,4]") + ",\"b\":" + Entry(f32, "[1]", "[0,4]") + "}",
           "xxxx"),
       "", "overlap tensor '"},
      {"MetadataNotObject", FileImage("{\"__metadata__\":\"pt\"}"), "", "__metadata__ is not"},
      {"MetadataNumberValue", FileImage("{\"__metadata__\":{\"format\":1}}"), "",
       "__metadata__ value of 'format' is not a string"},
      {"MetadataNullValue", FileImage("{\"__metadata__\":{\"k\":null}}"), "",
       "__metadata__ value of 'k'"},
      {"MetadataObjectValue", FileImage("{\"__metadata__\":{\"k\":{}}}"), "",
       "__metadata__ value of 'k'"},
  };
}

class HostileFileTest : public SafetensorsTest,
                        public ::testing::WithParamInterface<HostileCase> {};

TEST_P(HostileFileTest, FailsCleanlyNamingFileAndTensor) {
  const HostileCase& c = GetParam();
  const std::string path = Path(std::string(c.test_name) + ".safetensors");
  WriteAll(path, c.bytes);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
  EXPECT_THAT(file.status().message(), HasSubstr(path));
  EXPECT_THAT(file.status().message(), HasSubstr(c.message));
  if (*c.tensor != '\0') {
    EXPECT_THAT(file.status().message(), HasSubstr(std::string("tensor '") + c.tensor + "'"));
  }
}

INSTANTIATE_TEST_SUITE_P(All, HostileFileTest, ::testing::ValuesIn(HostileCases()),
                         [](const auto& info) { return std::string(info.param.test_name); });

// Valid edge cases the parser must accept.
TEST(ParseSafetensorsHeaderTest, AcceptsEdgeCases) {
  const std::string f32 = "\"F32\"";
  const std::vector<std::string> images = {
      FileImage("{}"),
      FileImage("{}      "),
      FileImage("  {\"__metadata__\":{}}  "),
      FileImage("{\"e\":" + Entry(f32, "[0,5]", "[0,0]") + "}"),
      FileImage("{\"s\":" + Entry(f32, "[]", "[0,4]") + "}", "abcd"),
      // Trailing bytes no tensor claims are allowed.
      FileImage("{\"w\":" + Entry(f32, "[1]", "[4,8]") + "}", "abcdefghij"),
      // A zero dimension makes any other dimension harmless.
      FileImage("{\"z\":" + Entry(f32, "[0,9223372036854775807]", "[0,0]") + "}"),
      FileImage("{\"z\":" + Entry(f32, "[9223372036854775807,9223372036854775807,0]", "[0,0]") +
                "}"),
  };
  for (const std::string& image : images) {
    absl::StatusOr<SafetensorsHeader> h = ParseSafetensorsHeader(
        reinterpret_cast<const uint8_t*>(image.data()), image.size(), "edge.safetensors");
    ASSERT_TRUE(h.ok()) << h.status() << "\n" << image.substr(8);
    ExpectInBounds(*h, image.size());
  }
}

// The fuzzer's seed corpus: valid_* files must parse, invalid_* must not.
TEST(ParseSafetensorsHeaderTest, FuzzSeedCorpusParsesAsNamed) {
  int seeds = 0;
  for (const auto& entry : fs::directory_iterator("tests/fuzz_corpus/safetensors")) {
    const std::string name = entry.path().filename().string();
    const std::string image = ReadAll(entry.path().string());
    absl::StatusOr<SafetensorsHeader> h =
        ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(image.data()), image.size(), name);
    if (name.starts_with("valid_")) {
      ASSERT_TRUE(h.ok()) << h.status();
      ExpectInBounds(*h, image.size());
    } else {
      EXPECT_FALSE(h.ok()) << name;
    }
    ++seeds;
  }
  EXPECT_GT(seeds, 0);
}

TEST(ParseSafetensorsHeaderTest, LabelNamesTheFileInErrors) {
  const std::string image = FileImage("[]");
  absl::StatusOr<SafetensorsHeader> h = ParseSafetensorsHeader(
      reinterpret_cast<const uint8_t*>(image.data()), image.size(), "some/label.safetensors");
  ASSERT_FALSE(h.ok());
  EXPECT_THAT(h.status().message(), HasSubstr("some/label.safetensors"));
}

class MutationSweepTest : public SafetensorsTest {
 protected:
  // A small valid file with several dtypes, an empty tensor and metadata.
  std::string ValidImage() {
    const std::string path = Path("seed.safetensors");
    EXPECT_TRUE(WriteSafetensors(path,
                                 {{"a", Patterned(DType::kF32, {2, 3}, 1)},
                                  {"b", Patterned(DType::kBF16, {5}, 2)},
                                  {"c", Tensor::Empty(DType::kI64, {0, 2})},
                                  {"d", Patterned(DType::kU8, {3}, 3)}},
                                 {{"format", "pt"}})
                    .ok());
    return ReadAll(path);
  }

  // Parses `image` from an exactly-sized heap copy, so ASan sees any read past it, and
  // checks the outcome: accepted and in bounds, or rejected naming the file. Returns
  // whether it was accepted.
  static bool ParsesSafely(const std::string& image, const std::string& what) {
    std::vector<uint8_t> copy(image.begin(), image.end());
    absl::StatusOr<SafetensorsHeader> h =
        ParseSafetensorsHeader(copy.data(), copy.size(), "mutant.safetensors");
    if (h.ok()) {
      SCOPED_TRACE(what);
      ExpectInBounds(*h, image.size());
      return true;
    }
    EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_THAT(h.status().message(), HasSubstr("mutant.safetensors")) << what;
    return false;
  }
};

TEST_F(MutationSweepTest, EveryHeaderByteMutationFailsCleanlyOrStaysInBounds) {
  const std::string valid = ValidImage();
  absl::StatusOr<SafetensorsHeader> original =
      ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(valid.data()), valid.size(), "seed");
  ASSERT_TRUE(original.ok()) << original.status();
  const size_t header_end = original->data_start;
  int accepted = 0, rejected = 0;
  for (size_t pos = 0; pos < header_end; ++pos) {
    const int byte = static_cast<uint8_t>(valid[pos]);
    const int values[] = {0x00,
                          0xff,
                          0x80,
                          '0',
                          '9',
                          '-',
                          '"',
                          '{',
                          '}',
                          '[',
                          ']',
                          ',',
                          ' ',
                          byte ^ 1,
                          (byte + 1) & 0xff,
                          (byte - 1) & 0xff};
    for (int value : values) {
      if (value == byte) continue;
      std::string mutant = valid;
      mutant[pos] = static_cast<char>(value);
      const bool ok =
          ParsesSafely(mutant, "byte " + std::to_string(pos) + " = " + std::to_string(value));
      if (HasFailure()) return;
      (ok ? accepted : rejected)++;
    }
  }
  // The sweep must exercise both outcomes to mean anything.
  EXPECT_GT(accepted, 0);
  EXPECT_GT(rejected, 0);
}

TEST_F(MutationSweepTest, EveryTruncationFailsCleanlyOrStaysInBounds) {
  const std::string valid = ValidImage();
  for (size_t size = 0; size < valid.size(); ++size) {
    ParsesSafely(valid.substr(0, size), "size " + std::to_string(size));
    if (HasFailure()) return;
  }
}

TEST_F(MutationSweepTest, DeletingOrDuplicatingAHeaderByteFailsCleanly) {
  const std::string valid = ValidImage();
  absl::StatusOr<SafetensorsHeader> original =
      ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(valid.data()), valid.size(), "seed");
  ASSERT_TRUE(original.ok()) << original.status();
  for (size_t pos = 8; pos < original->data_start; ++pos) {
    std::string deleted = valid;
    deleted.erase(pos, 1);
    ParsesSafely(deleted, "deleted byte " + std::to_string(pos));
    std::string duplicated = valid;
    duplicated.insert(pos, 1, valid[pos]);
    ParsesSafely(duplicated, "duplicated byte " + std::to_string(pos));
    if (HasFailure()) return;
  }
}

}  // namespace
}  // namespace moemesh
