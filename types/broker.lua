---@meta
-- LuaLS type stubs for the `broker` module (docs/broker.md).

---An address: "1.2.3.4:80" or "[::1]:80".
---@alias broker.addr string

---A connection (or UDP socket). Any other field is the script's own.
---@class broker.socket
---@field id integer the socket id, unique in the process (also socket[0])
---@field [0] integer
---@field [1] broker.addr|nil the peer address
---@field [-1] broker.addr|nil the local address
---@field path? string ws:// and wss:// accepted sockets: the upgrade request's path and query ("/game?room=3")
---@field receive? fun(socket: broker.socket, data: any, addr?: broker.addr): any frames of a joined socket go here unless on_connect returned a function
---@field onclose? fun(socket: broker.socket, errno: integer) older spelling of the close callback (used when neither `socket.close = f` nor port.close is set)
---The socket's key (STAGE's frame encryption, docs/broker.md): assign a key,
---`{["AES/CBC/PKCS5Padding"] = key}` or nil; reads back as true/false. Tables committed on
---bson/packet sockets go out encrypted, encrypted frames are opened; strings go as their bytes.
---
---```lua
---socket.crypto = "shared secret"
---socket.crypto = { ["AES/CBC/PKCS5Padding"] = "shared secret" }
---if socket.crypto then socket.commit({ sealed = true }) end
---```
---@field crypto boolean|string|table<string, string>|nil
---The last error the broker saw on this socket (0 when none; ETIMEDOUT 110 on expire or a
---join timeout, ECONNREFUSED 111, ...). Read-only (assigning raises); readable after close.
---
---```lua
---if s.errno ~= 0 then logger.warn("socket " .. s.id .. " failed, errno " .. s.errno) end
---```
---@field errno integer
local socket = {}

---Queues `v` framed per the socket's framing and returns the bytes queued (0 when closed).
---bson/packet: a table → a BSON document (encrypted with `socket.crypto`), a string → its bytes;
---text: a table → a JSON line, a string or number → a line (`\n` added when missing);
---raw: a string or number → its bytes, a table → BSON.
---
---```lua
---socket.commit({ hp = 100 })     -- bson: a document; text: {"hp":100}\n
---socket.commit("ready")          -- text: "ready\n"; raw and bson: the bytes "ready"
---```
---@param v table|string|number
---@param addr? broker.addr UDP: the destination
---@return integer bytes queued (0 when closed)
function socket.commit(v, addr) end

---Sends what is queued, then closes the connection; the close callback runs with errno 0.
---Assigning a function instead sets the close callback `f(socket, errno)` (nil removes it);
---`socket.close()` still closes.
---
---```lua
---socket.close = function (s, errno) logger.info("closed " .. s.id .. ", errno " .. errno) end
---socket.close()
---```
function socket.close() end

---A listening port.
---@class broker.port
---@field id integer for broker.close
---@field port integer the bound port (useful with port 0)
---@field [-1] broker.addr the local address
---@field receive? fun(socket: broker.socket, data: any, addr?: broker.addr): any called with each frame when accept returned true; its first return value, when non-nil, is committed
---@field close? fun(socket: broker.socket, errno: integer) called when an accepted connection closes (errno 0 normally, 110 on expire), unless the socket set its own
---@field expire? integer close connections idle this many ms (-1: never)
---@field commit? integer hold replies this many ms to coalesce writes
---A key copied to each connection the port accepts afterwards (see broker.socket.crypto);
---reads back as true/false.
---
---```lua
---port.crypto = "shared secret"
---```
---@field crypto boolean|string|table<string, string>|nil

---@class broker.addrinfo
---@field family 2|10 AF_INET or AF_INET6 (STAGE)
---@field addr string
---@field port integer
---@field scope_id? integer IPv6 only

---@class broker
broker = {}

---An HTTP request (docs/http.md).
---@class broker.request
---@field method string "GET", "POST", ...
---@field path string percent-decoded
---@field query table<string, string|string[]> decoded; a repeated name gives a list
---@field headers table<string, string> lower-case names
---@field body string the whole body ("" when none)
---@field remote broker.addr the peer
---@field version string "HTTP/1.1", "HTTP/2" or "HTTP/1.0"

---What an HTTP handler returns as a table.
---@class broker.response
---@field status? integer default 200
---@field headers? table<string, string|number|string[]>
---@field body? string|table|fun(): string|nil a string, a table (JSON), or a function called for each chunk until nil

---Options of an http:// or https:// listener.
---@class broker.http_options
---@field max_body? integer|string largest body (IN), default "1m"; over it: 413
---@field max_head? integer|string largest request head, default "16k"; over it: 431
---@field timeout? integer ms to send a complete request head, default 10000; then 408
---@field cert? string PEM certificate chain (https), relative to the home; default #tls.cert
---@field key? string PEM private key (https); default #tls.key

---Options of a tls://, ws:// or wss:// listener.
---@class broker.tls_options
---@field cert? string PEM certificate chain, relative to the home; default #tls.cert
---@field key? string PEM private key; default #tls.key

---Options of broker.join.
---@class broker.join_options
---@field ca? string tls://, wss://: PEM file of extra trusted roots (a private CA), relative to the home; default #tls.ca
---@field name? string tls://, wss://: the name the server's certificate must carry; default the URI's host
---@field timeout? integer tcp://: ms to wait for the connection (default 3000)

---Listens on `tcp://host:port?FRAMING=IN,OUT`, `udp://host:port?FRAMING`, `tls://host:port?FRAMING`,
---`ws://host:port/path?FRAMING` or `wss://...` (each WebSocket message one frame; docs/broker.md).
---FRAMING: `bson` and `packet` (a BSON document → a table), `text` (a line with its `\n`),
---`raw` or none (a byte stream, strings of at most IN bytes). IN and OUT default to 8 KiB.
---`accept` returns a function (its receive function), true (use port.receive) or false (refuse).
---
---```lua
---broker.ready("ws://0.0.0.0:8081/game?bson", function (socket, addr)
---    return function (socket, msg) return { echo = msg } end
---end)
---```
---With `http://` or `https://`, the second argument is the request handler (docs/http.md).
---@param uri string
---@param accept fun(socket: broker.socket, addr: broker.addr|nil): (fun(socket: broker.socket, data: any, addr?: broker.addr): any)|boolean|nil
---@return broker.port|broker.socket|integer port (UDP: the socket), or an errno
---@return string? message on failure
---@overload fun(uri: string, handler: fun(req: broker.request): (broker.response|string|integer|nil), options?: broker.http_options): broker.port|integer, string?
---@overload fun(uri: string, accept: fun(socket: broker.socket, addr: broker.addr|nil): any, options?: broker.tls_options): broker.port|integer, string?
function broker.ready(uri, accept) end

---Connects. tcp:// and udp:// return the socket at once and connect in the background
---(commits are queued); `on_connect(socket, addr)` runs once connected; a failed or timed-out
---connect (3 s unless `timeout_ms`) calls the close callback with `(socket, errno)`.
---tls://, ws://, wss:// connect and handshake before returning. A bad URI or an unresolvable
---name returns `-1` (or an errno) and a message.
---
---```lua
---local c = broker.join("tcp://127.0.0.1:8801?bson", function (socket, addr)
---    return function (socket, reply) logger.info(bundle.json(reply)) end
---end, 1000)
---c.close = function (socket, errno) if errno ~= 0 then logger.warn("errno " .. errno) end end
---c.commit({ cmd = "login" })           -- queued until connected
---local s = broker.join("wss://127.0.0.1:8443/game?bson", nil, { ca = "conf/ca.pem" })
---```
---@param uri string
---@param on_connect? fun(socket: broker.socket, addr: broker.addr): (fun(socket: broker.socket, data: any): any)|boolean|nil
---@param options? integer|broker.join_options timeout in ms, or the options table
---@return broker.socket|integer socket, or an errno (-1 for a bad URI)
---@return string? message on failure
---@overload fun(uri: string, timeout_ms: integer): broker.socket|integer, string?
function broker.join(uri, on_connect, options) end

---Closes sockets or ports of this instance.
---@param id integer|broker.socket|integer[]
---@return integer closed
function broker.close(id) end

---The socket object of an id of this instance.
---@param id integer
---@return broker.socket|nil
function broker.f(id) end

---id: deliver v as if received; {ids}: send v to them; "host:port": send one UDP datagram.
---@param target integer|integer[]|broker.addr
---@param v table|string
---@return integer reached
function broker.signal(target, v) end

---stage.submit keyed by the socket; calls `f(socket, ...)`.
---@param socket broker.socket|integer
---@param f function
---@param ... any
function broker.submit(socket, f, ...) end

---The text form of an address (text or STAGE's raw sockaddr); with `t`, fills and returns
---t.family (2|10), t.addr, t.port, t.scope_id.
---@param addr broker.addr|{addr: string, port: integer}
---@param t? table
---@return broker.addr|broker.addrinfo
function broker.ntoa(addr, t) end

---`aton("[scheme://]host:port")`: the first address (nil when none); `aton(s, {})`: all of
---them as a list; `aton(family, {addr=, port=, scope_id=})`: an address built from parts.
---@param s string|integer
---@param t? table|string
---@return broker.addr|broker.addr[]|nil
function broker.aton(s, t) end

---`{ [interface] = {address, ...} }` without loopback; `name` keeps the interfaces whose name contains it.
---@param name? string
---@return table<string, broker.addr[]>
function broker.ifaddr(name) end

---STAGE's encrypted frame of `t`: AES-256-CBC (key zero-padded to 32, IV of 16 spaces, PKCS#7),
---the length's high bit set. `how` is a key or `{["AES/CBC/PKCS5Padding"] = key}`.
---@param how string|table<string, string>
---@param t table
---@return string
function broker.encrypt(how, t) end

---Opens an encrypted frame (or decodes plain BSON) into a table; other data comes back as is.
---@param how string|table<string, string>
---@param data string
---@return table|string
function broker.decrypt(how, data) end

return broker
