// .npy reader and writer (see kvc/eval/npy.hpp). Format reference: numpy/lib/format.py (NEP 1).
#include "kvc/eval/npy.hpp"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <string_view>

#include "kvc/core/error.hpp"

namespace kvc {
namespace {

constexpr std::string_view kMagic{"\x93NUMPY", 6};
constexpr std::size_t kAlignment = 64;  // numpy's ARRAY_ALIGN: data starts at a multiple of it

struct DescrInfo {
  std::string_view descr;
  DType dtype;
};
constexpr DescrInfo kReadable[] = {{"<f2", DType::f16}, {"<f4", DType::f32}, {"<f8", DType::f64},
                                   {"<i4", DType::i32}, {"|u1", DType::u8},  {"<u1", DType::u8}};
constexpr std::string_view kReadableList = "<f2, <f4, <f8, <i4, |u1, <u1";

std::string printable(std::string_view bytes) {
  std::string out;
  for (const char ch : bytes) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += ch;
    } else {
      char hex[8];
      std::snprintf(hex, sizeof hex, "\\x%02x", c);
      out += hex;
    }
  }
  return out;
}

std::string read_whole_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  KVC_CHECK(in.good(), "cannot open ", path.string(), " for reading");
  std::string data;
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  KVC_CHECK(size >= 0, "cannot determine the size of ", path.string());
  in.seekg(0, std::ios::beg);
  data.resize(static_cast<std::size_t>(size));
  in.read(data.data(), size);
  KVC_CHECK(in.gcount() == size, "read error on ", path.string(), ": got ", in.gcount(), " of ",
            size, " bytes");
  return data;
}

// The header is a Python dict literal such as
//   {'descr': '<f2', 'fortran_order': False, 'shape': (8, 2, 512, 64), }
// This parses exactly the subset numpy writes: str keys, str/bool/tuple-of-int values.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::filesystem::path& path)
      : text_(text), path_(path) {}

  struct Header {
    std::string descr;
    bool fortran_order = false;
    std::vector<std::int64_t> shape;
  };

  Header parse() {
    Header h;
    bool has_descr = false, has_order = false, has_shape = false;
    skip_space();
    expect('{', "'{' opening the header dict");
    while (true) {
      skip_space();
      if (peek_is('}')) break;
      const std::string key = string();
      skip_space();
      expect(':', "':' after key '" + key + "'");
      skip_space();
      if (key == "descr") {
        if (!peek_is('\'') && !peek_is('"'))
          fail("a dtype string for 'descr' (structured dtypes are not supported; allowed: " +
               std::string(kReadableList) + ")");
        h.descr = string();
        has_descr = true;
      } else if (key == "fortran_order") {
        h.fortran_order = boolean();
        has_order = true;
      } else if (key == "shape") {
        h.shape = tuple();
        has_shape = true;
      } else {
        KVC_FAIL(path_.string(), ": .npy header has unexpected key '", key,
                 "' (allowed: descr, fortran_order, shape)");
      }
      skip_space();
      if (peek_is(',')) {
        ++pos_;
        continue;
      }
      if (!peek_is('}')) fail("',' or '}' in the header dict");
    }
    ++pos_;  // '}'
    skip_space();
    if (pos_ != text_.size()) fail("only spaces and a newline after the header dict");
    KVC_CHECK(has_descr && has_order && has_shape, path_.string(), ": .npy header lacks ",
              !has_descr   ? "'descr'"
              : !has_order ? "'fortran_order'"
                           : "'shape'",
              " (it needs descr, fortran_order and shape)");
    return h;
  }

 private:
  [[noreturn]] void fail(const std::string& expected) const {
    KVC_FAIL(path_.string(), ": malformed .npy header at byte ", pos_, " of the header: expected ",
             expected, ", found ",
             pos_ < text_.size() ? "'" + printable(text_.substr(pos_, 1)) + "'"
                                 : std::string("the end of the header"),
             " (header: \"", printable(text_.substr(0, 200)), "\")");
  }
  bool peek_is(char c) const { return pos_ < text_.size() && text_[pos_] == c; }
  void expect(char c, const std::string& what) {
    if (!peek_is(c)) fail(what);
    ++pos_;
  }
  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\n' ||
                                   text_[pos_] == '\t' || text_[pos_] == '\r'))
      ++pos_;
  }
  std::string string() {
    if (!peek_is('\'') && !peek_is('"')) fail("a quoted string");
    const char quote = text_[pos_++];
    const std::size_t end = text_.find(quote, pos_);
    if (end == std::string_view::npos) fail("a closing quote");
    std::string s(text_.substr(pos_, end - pos_));
    if (s.find('\\') != std::string::npos) fail("a string without escapes");
    pos_ = end + 1;
    return s;
  }
  bool boolean() {
    if (text_.substr(pos_, 4) == "True") {
      pos_ += 4;
      return true;
    }
    if (text_.substr(pos_, 5) == "False") {
      pos_ += 5;
      return false;
    }
    fail("True or False");
  }
  std::vector<std::int64_t> tuple() {
    expect('(', "'(' opening the shape tuple");
    std::vector<std::int64_t> shape;
    skip_space();
    while (!peek_is(')')) {
      if (pos_ >= text_.size() || text_[pos_] < '0' || text_[pos_] > '9')
        fail("a non-negative integer in the shape tuple");
      std::int64_t n = 0;
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
        if (n > (std::int64_t{1} << 48)) fail("a dimension below 2^48");
        n = n * 10 + (text_[pos_++] - '0');
      }
      if (peek_is('L')) ++pos_;  // Python 2 long suffix
      shape.push_back(n);
      skip_space();
      if (peek_is(',')) {
        ++pos_;
        skip_space();
      } else if (!peek_is(')')) {
        fail("',' or ')' in the shape tuple");
      }
    }
    ++pos_;
    return shape;
  }

  std::string_view text_;
  const std::filesystem::path& path_;
  std::size_t pos_ = 0;
};

DType dtype_of_descr(const std::string& descr, const std::filesystem::path& path) {
  for (const auto& entry : kReadable)
    if (descr == entry.descr) return entry.dtype;
  KVC_CHECK(descr.empty() || descr[0] != '>', path.string(), ": big-endian dtype '", descr,
            "' is not supported; kvc reads little-endian .npy files (allowed: ", kReadableList,
            "; convert with array.astype('<", descr.substr(1), "'))");
  KVC_FAIL(path.string(), ": unsupported .npy dtype '", descr, "' (allowed: ", kReadableList, ")");
}

std::string_view descr_of_dtype(DType dtype, const std::filesystem::path& path) {
  switch (dtype) {
    case DType::f16:
      return "<f2";
    case DType::f32:
      return "<f4";
    case DType::f64:
      return "<f8";
    case DType::i32:
      return "<i4";
    case DType::u8:
      return "|u1";
    default:
      KVC_FAIL("cannot write ", path.string(), ": .npy has no dtype for ", dtype_name(dtype),
               " (allowed: f16, f32, f64, i32, u8)");
  }
}

}  // namespace

Array read_npy(const std::filesystem::path& path) {
  const std::string file = read_whole_file(path);
  KVC_CHECK(file.size() >= 10 && std::string_view(file).substr(0, 6) == kMagic, path.string(),
            ": not a .npy file (starts with \"", printable(std::string_view(file).substr(0, 6)),
            "\"; expected \"\\x93NUMPY\")");
  const int major = static_cast<unsigned char>(file[6]);
  const int minor = static_cast<unsigned char>(file[7]);
  KVC_CHECK((major == 1 || major == 2 || major == 3) && minor == 0, path.string(),
            ": unsupported .npy format version ", major, ".", minor, " (supported: 1.0, 2.0, 3.0)");
  std::size_t header_length = 0, header_start = 0;
  const auto byte = [&](std::size_t i) {
    return static_cast<std::size_t>(static_cast<unsigned char>(file[i]));
  };
  if (major == 1) {
    header_length = byte(8) | byte(9) << 8;
    header_start = 10;
  } else {
    KVC_CHECK(file.size() >= 12, path.string(), ": truncated .npy preamble (", file.size(),
              " bytes; a version ", major, " preamble has 12)");
    header_length = byte(8) | byte(9) << 8 | byte(10) << 16 | byte(11) << 24;
    header_start = 12;
  }
  KVC_CHECK(header_start + header_length <= file.size(), path.string(),
            ": truncated .npy header: it declares ", header_length, " bytes, the file has ",
            file.size() - header_start, " after the preamble");
  // Version 3.0 only differs by allowing UTF-8 in the header (field names of structured dtypes,
  // which are not accepted anyway), so one parser serves all three versions.
  const HeaderParser::Header header =
      HeaderParser(std::string_view(file).substr(header_start, header_length), path).parse();
  const DType dtype = dtype_of_descr(header.descr, path);
  KVC_CHECK(!header.fortran_order, path.string(),
            ": Fortran-order (column-major) arrays are not supported; kvc reads C order (save "
            "with numpy.ascontiguousarray(x))");

  Array a;
  a.dtype = dtype;
  a.shape = header.shape;
  std::int64_t expected = 0;
  try {
    expected = a.byte_size();
  } catch (const Error& e) {
    KVC_FAIL(path.string(), ": ", e.message());
  }
  const std::size_t data_start = header_start + header_length;
  const auto actual = static_cast<std::int64_t>(file.size() - data_start);
  KVC_CHECK(actual >= expected, path.string(), ": truncated .npy data: shape ",
            shape_string(a.shape), " of '", header.descr, "' needs ", expected,
            " bytes of data, the file has ", actual);
  KVC_CHECK(actual == expected, path.string(), ": ", actual - expected,
            " bytes of trailing garbage after the .npy data (shape ", shape_string(a.shape),
            " of '", header.descr, "' needs ", expected, " bytes, the file has ", actual, ")");
  a.bytes.resize(static_cast<std::size_t>(expected));
  if (expected) std::memcpy(a.bytes.data(), file.data() + data_start, a.bytes.size());
  return a;
}

void write_npy(const std::filesystem::path& path, const Array& array) {
  const std::string_view descr = descr_of_dtype(array.dtype, path);
  KVC_CHECK(static_cast<std::int64_t>(array.bytes.size()) == array.byte_size(), "cannot write ",
            path.string(), ": array of shape ", shape_string(array.shape), " and dtype ",
            dtype_name(array.dtype), " needs ", array.byte_size(), " bytes, holds ",
            array.bytes.size());
  std::string shape = "(";
  for (std::size_t i = 0; i < array.shape.size(); ++i) {
    if (i) shape += ", ";
    shape += std::to_string(array.shape[i]);
  }
  if (array.shape.size() == 1) shape += ',';
  shape += ')';
  std::string header =
      "{'descr': '" + std::string(descr) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  // Version 1.0 stores the header length in 2 bytes; longer headers (ranks in the thousands) need
  // version 2.0.
  const auto padded_length = [&](std::size_t preamble) {
    const std::size_t unpadded = preamble + header.size() + 1;  // + the final '\n'
    return header.size() + 1 + (kAlignment - unpadded % kAlignment) % kAlignment;
  };
  int major = 1;
  std::size_t length = padded_length(10);
  if (length > 65535) {
    major = 2;
    length = padded_length(12);
  }
  header.resize(length - 1, ' ');
  header += '\n';

  std::string out(kMagic);
  out += static_cast<char>(major);
  out += '\0';
  out += static_cast<char>(length & 0xff);
  out += static_cast<char>((length >> 8) & 0xff);
  if (major == 2) {
    out += static_cast<char>((length >> 16) & 0xff);
    out += static_cast<char>((length >> 24) & 0xff);
  }
  out += header;

  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  KVC_CHECK(file.good(), "cannot open ", path.string(), " for writing");
  file.write(out.data(), static_cast<std::streamsize>(out.size()));
  file.write(reinterpret_cast<const char*>(array.bytes.data()),
             static_cast<std::streamsize>(array.bytes.size()));
  file.close();
  KVC_CHECK(!file.fail(), "write error on ", path.string());
}

}  // namespace kvc
