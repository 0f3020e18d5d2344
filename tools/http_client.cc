#include "tools/http_client.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace moemesh {
namespace {

// Decodes a "Transfer-Encoding: chunked" body.
absl::StatusOr<std::string> Dechunk(absl::string_view in) {
  std::string out;
  while (true) {
    const size_t eol = in.find("\r\n");
    if (eol == absl::string_view::npos) return absl::DataLossError("truncated chunked body");
    uint64_t size = 0;
    const absl::string_view size_text = in.substr(0, in.find_first_of(";\r"));
    if (!absl::SimpleHexAtoi(size_text, &size)) return absl::DataLossError("bad chunk size");
    in.remove_prefix(eol + 2);
    if (size == 0) return out;
    if (in.size() < size + 2) return absl::DataLossError("truncated chunk");
    out.append(in.data(), size);
    in.remove_prefix(size + 2);
  }
}

}  // namespace

std::string UrlEncode(const std::string& text) {
  std::string out;
  for (unsigned char c : text) {
    if (absl::ascii_isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      absl::StrAppend(&out, "%", absl::Hex(c, absl::kZeroPad2));
    }
  }
  return out;
}

absl::StatusOr<HttpReply> HttpGet(const std::string& url, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  if (!absl::StartsWith(url, "http://")) {
    return absl::InvalidArgumentError(absl::StrCat("not an http:// URL: ", url));
  }
  const std::string rest = url.substr(7);
  const size_t slash = rest.find('/');
  const std::string authority = rest.substr(0, slash);
  const std::string path = slash == std::string::npos ? "/" : rest.substr(slash);
  const size_t colon = authority.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("URL has no port: ", url));
  }
  const std::string host = authority.substr(0, colon), port = authority.substr(colon + 1);

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* addresses = nullptr;
  if (::getaddrinfo(host.c_str(), port.c_str(), &hints, &addresses) != 0 || addresses == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot resolve ", authority));
  }
  int fd = -1;
  for (addrinfo* a = addresses; a != nullptr && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd >= 0 && ::connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(addresses);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("cannot connect to ", authority));

  const std::string request = absl::StrCat("GET ", path, " HTTP/1.1\r\nHost: ", authority,
                                           "\r\nAccept: */*\r\nConnection: close\r\n\r\n");
  std::string raw;
  absl::Status status = absl::OkStatus();
  if (::send(fd, request.data(), request.size(), MSG_NOSIGNAL) !=
      static_cast<ssize_t>(request.size())) {
    status = absl::UnavailableError(absl::StrCat("cannot send to ", authority));
  }
  while (status.ok()) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        end - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      status = absl::DeadlineExceededError(absl::StrCat("GET ", url, " timed out"));
      break;
    }
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
    char buf[16384];
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0) status = absl::UnavailableError(absl::StrCat("read from ", authority, " failed"));
    if (n <= 0) break;
    raw.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  if (!status.ok()) return status;

  const size_t header_end = raw.find("\r\n\r\n");
  if (header_end == std::string::npos) {
    return absl::DataLossError(absl::StrCat(authority, " sent no complete HTTP header"));
  }
  HttpReply reply;
  bool chunked = false;
  int64_t length = -1;
  const std::vector<std::string> lines =
      absl::StrSplit(absl::string_view(raw).substr(0, header_end), "\r\n");
  const std::vector<std::string> status_line = absl::StrSplit(lines[0], ' ');
  if (status_line.size() < 2 || !absl::SimpleAtoi(status_line[1], &reply.status)) {
    return absl::DataLossError(absl::StrCat("bad status line from ", authority, ": ", lines[0]));
  }
  for (size_t i = 1; i < lines.size(); ++i) {
    const size_t c = lines[i].find(':');
    if (c == std::string::npos) continue;
    const std::string name = absl::AsciiStrToLower(lines[i].substr(0, c));
    const std::string value(absl::StripAsciiWhitespace(lines[i].substr(c + 1)));
    if (name == "content-type") reply.content_type = value;
    if (name == "transfer-encoding" && absl::StrContains(absl::AsciiStrToLower(value), "chunked"))
      chunked = true;
    if (name == "content-length" && !absl::SimpleAtoi(value, &length)) {
      return absl::DataLossError(absl::StrCat(authority, " sent a bad Content-Length: ", value));
    }
  }
  const absl::string_view body = absl::string_view(raw).substr(header_end + 4);
  if (chunked) {
    auto decoded = Dechunk(body);
    if (!decoded.ok()) return decoded.status();
    reply.body = *std::move(decoded);
  } else {
    if (length >= 0 && static_cast<int64_t>(body.size()) < length) {
      return absl::DataLossError(absl::StrCat(authority, " closed before the whole body"));
    }
    reply.body = std::string(length >= 0 ? body.substr(0, static_cast<size_t>(length)) : body);
  }
  return reply;
}

}  // namespace moemesh
