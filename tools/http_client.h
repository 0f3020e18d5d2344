// A minimal HTTP/1.1 GET client over a plain TCP socket, for the tools and tests that
// read Prometheus (/metrics, the query API): no TLS, no redirects, no chunked bodies
// beyond what Prometheus and civetweb send (Content-Length or connection close; chunked
// replies are decoded).
#pragma once

#include <chrono>
#include <string>

#include "absl/status/statusor.h"

namespace moemesh {

struct HttpReply {
  int status = 0;
  std::string content_type;
  std::string body;
};

// GET `url` ("http://HOST:PORT/PATH?QUERY", HOST an IPv4 address or a name). UNAVAILABLE
// when the connection fails, DEADLINE_EXCEEDED after `timeout`, INVALID_ARGUMENT for a
// URL it cannot parse.
absl::StatusOr<HttpReply> HttpGet(const std::string& url,
                                  std::chrono::milliseconds timeout = std::chrono::seconds(10));

// Percent-encodes `text` for a query string value (RFC 3986 unreserved kept).
std::string UrlEncode(const std::string& text);

}  // namespace moemesh
