/* A tiny HTTP/1.1 server that runs as init (PID 1) in an xcgi guest.
 *
 *   http-hello [--once] [PORT]        (PORT defaults to 80; arguments in any order)
 *
 * Listens on 0.0.0.0:PORT and serves one connection at a time, then closes it:
 *   GET /            200 text/plain "Hello from a fresh VM!\n"   (a query string is ignored)
 *   GET /stall       200 with Content-Length 1000000, 5 bytes of it, then nothing, ever (the
 *                    connection stays open: a server that hangs mid-response, for tests)
 *   GET <other>      404
 *   other methods    405 (with Allow: GET)
 *   400 for a malformed request line, a head over 8 KiB, a head cut short by the client's EOF,
 *       or a version other than HTTP/1.x
 *   408 for a head still incomplete after the read timeout (5 s, also an overall deadline);
 *       a client that sent nothing then is closed without a response
 * Every response carries Content-Type, Content-Length and Connection: close.
 *
 * --once, or HTTP_HELLO_ONCE=1 in the environment (e.g. on the kernel command line, which the
 * kernel hands to init as environment), exits 0 after the first connection that got a response.
 * As PID 1 that exit ends the VM (the kernel panics with exitcode=0, which the VMM reads).
 * Before exiting, the socket is closed gracefully: our FIN goes out after the response, and we
 * wait (briefly) for the client's close, so the response has reached the client before the VM
 * disappears.
 *
 * Before the first accept it prints "http-hello: listening on :PORT" to stdout (flushed): the host
 * watches the guest console for it. Errors go to stderr. A client error never ends the server.
 * The only fatal errors are at startup (socket/bind/listen), which exit 1.
 *
 * Build static: gcc -static -O2 -Wall -Werror -o http-hello http-hello.c */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define HEAD_MAX 8192           /* request head size cap (request line + headers + blank line) */
#define READ_TIMEOUT_S 5        /* per-recv timeout (SO_RCVTIMEO) and overall head deadline */
#define LINGER_TIMEOUT_MS 1000  /* how long to wait for the client's close after responding */
#define LINGER_MAX_BYTES 65536  /* how much unread request body to discard while waiting */

static const char HELLO[] = "Hello from a fresh VM!\n";

/* Make sure fds 0, 1 and 2 are open, so that the listening socket never lands on one of them
 * (the kernel leaves them closed when it cannot open /dev/console). */
static void ensure_std_fds(void)
{
	for (int fd = 0; fd <= 2; fd++) {
		if (fcntl(fd, F_GETFD) != -1 || errno != EBADF)
			continue;
		int n = open("/dev/null", O_RDWR);
		if (n < 0)
			n = open("/", O_RDONLY); /* no /dev/null: any fd will do as a placeholder */
		if (n >= 0 && n != fd) {
			/* open() returns the lowest free fd, which is fd itself; this is just in case. */
			dup2(n, fd);
			close(n);
		}
	}
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void set_rcvtimeo(int fd, long ms)
{
	struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

/* Writes all of buf; gives up on any error but EINTR (the client went away: nothing to do). */
static void send_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		buf += n;
		len -= (size_t)n;
	}
}

static void respond(int fd, const char *status, const char *extra_headers, const char *body)
{
	char out[512];
	size_t blen = strlen(body);
	int n = snprintf(out, sizeof out,
			 "HTTP/1.1 %s\r\n"
			 "Content-Type: text/plain\r\n"
			 "Content-Length: %zu\r\n"
			 "%s"
			 "Connection: close\r\n"
			 "\r\n"
			 "%s",
			 status, blen, extra_headers, body);
	if (n < 0 || (size_t)n >= sizeof out)
		return; /* cannot happen with the fixed strings below */
	send_all(fd, out, (size_t)n);
}

/* Closes gracefully: send our FIN after the response, then read (and discard) until the client
 * closes, for at most LINGER_TIMEOUT_MS / LINGER_MAX_BYTES. Closing with unread input would make
 * the kernel send a RST, which can destroy the response before the client reads it (e.g. a POST
 * whose body we never read). */
static void close_gracefully(int fd)
{
	char buf[4096];
	size_t total = 0;
	long long deadline = now_ms() + LINGER_TIMEOUT_MS;

	if (shutdown(fd, SHUT_WR) == 0) {
		for (;;) {
			long long left = deadline - now_ms();
			if (left <= 0 || total >= LINGER_MAX_BYTES)
				break;
			set_rcvtimeo(fd, (long)left);
			ssize_t n = recv(fd, buf, sizeof buf, 0);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				break; /* EOF (the client closed), timeout, or reset */
			total += (size_t)n;
		}
	}
	close(fd);
}

static int is_tchar(unsigned char c)
{
	/* RFC 9110 token characters (for the method). */
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	       (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

enum head_result { HEAD_OK, HEAD_TOO_BIG, HEAD_TRUNCATED, HEAD_TIMEOUT, HEAD_GONE };

/* Reads until the end of the request head (an empty line). On HEAD_OK, *head_len is the length of
 * the head, which is then NUL-terminated in buf (buf must hold HEAD_MAX + 1 bytes). *got is the
 * number of bytes received in any case. */
static enum head_result read_head(int fd, char *buf, size_t *head_len, size_t *got)
{
	size_t len = 0;
	int seen_text = 0; /* whether a byte other than CR/LF came yet */
	long long deadline = now_ms() + READ_TIMEOUT_S * 1000LL;

	*got = 0;
	for (;;) {
		long long left = deadline - now_ms();
		if (left <= 0)
			return HEAD_TIMEOUT;
		set_rcvtimeo(fd, (long)left);
		ssize_t n = recv(fd, buf + len, HEAD_MAX - len, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return HEAD_TIMEOUT;
			return HEAD_GONE; /* ECONNRESET and friends */
		}
		if (n == 0)
			return len == 0 ? HEAD_GONE : HEAD_TRUNCATED; /* the client stopped sending */
		/* Look for the end of the head, rescanning a few bytes before the new data in case the
		 * terminator straddles two reads. Bare LF line ends are accepted too (RFC 9112 2.2). */
		size_t from = len >= 3 ? len - 3 : 0;
		len += (size_t)n;
		*got = len;
		for (size_t i = from; i < len; i++) {
			if (buf[i] != '\n') {
				if (buf[i] != '\r')
					seen_text = 1;
				continue;
			}
			if (!seen_text)
				continue; /* still in empty lines before the request line */
			if (i >= 1 && buf[i - 1] == '\n') {
				*head_len = i + 1;
				buf[*head_len] = '\0';
				return HEAD_OK;
			}
			if (i >= 2 && buf[i - 1] == '\r' && buf[i - 2] == '\n') {
				*head_len = i + 1;
				buf[*head_len] = '\0';
				return HEAD_OK;
			}
		}
		if (len >= HEAD_MAX)
			return HEAD_TOO_BIG;
	}
}

/* Parses the request line and answers. Returns 1 once a response has been sent. */
static int handle(int fd)
{
	static char buf[HEAD_MAX + 1];
	size_t head_len = 0, got = 0;

	switch (read_head(fd, buf, &head_len, &got)) {
	case HEAD_OK:
		break;
	case HEAD_TOO_BIG:
		respond(fd, "400 Bad Request", "", "request head too large\n");
		return 1;
	case HEAD_TRUNCATED:
		respond(fd, "400 Bad Request", "", "request head incomplete\n");
		return 1;
	case HEAD_TIMEOUT:
		if (got == 0)
			return 0; /* connected and said nothing: close without a response */
		respond(fd, "408 Request Timeout", "", "request head incomplete\n");
		return 1;
	case HEAD_GONE:
		return 0;
	}

	/* Skip empty lines before the request line (RFC 9112 2.2 allows at least one). */
	char *p = buf;
	while (*p == '\r' || *p == '\n')
		p++;
	char *eol = strchr(p, '\n');
	if (eol == NULL || p == eol) {
		respond(fd, "400 Bad Request", "", "malformed request\n");
		return 1;
	}
	*eol = '\0';
	if (eol > p && eol[-1] == '\r')
		eol[-1] = '\0';

	/* request-line = method SP request-target SP HTTP-version */
	char *method = p;
	char *sp1 = strchr(method, ' ');
	char *target = sp1 ? sp1 + 1 : NULL;
	char *sp2 = target ? strchr(target, ' ') : NULL;
	char *version = sp2 ? sp2 + 1 : NULL;
	if (sp1 == NULL || sp2 == NULL || sp1 == method || sp2 == target ||
	    strchr(version, ' ') != NULL) {
		respond(fd, "400 Bad Request", "", "malformed request line\n");
		return 1;
	}
	*sp1 = '\0';
	*sp2 = '\0';
	for (char *m = method; *m; m++) {
		if (!is_tchar((unsigned char)*m)) {
			respond(fd, "400 Bad Request", "", "malformed method\n");
			return 1;
		}
	}
	for (char *t = target; *t; t++) {
		if ((unsigned char)*t <= ' ' || *t == 0x7f) {
			respond(fd, "400 Bad Request", "", "malformed request target\n");
			return 1;
		}
	}
	if (strncmp(version, "HTTP/1.", 7) != 0 || version[7] < '0' || version[7] > '9' ||
	    version[8] != '\0') {
		respond(fd, "400 Bad Request", "", "unsupported HTTP version\n");
		return 1;
	}

	if (strcmp(method, "GET") != 0) {
		respond(fd, "405 Method Not Allowed", "Allow: GET\r\n", "method not allowed\n");
		return 1;
	}
	/* The path is the target up to any query ('?'); fragments never reach a server. */
	size_t path_len = strcspn(target, "?");
	if (path_len == 1 && target[0] == '/')
		respond(fd, "200 OK", "", HELLO);
	else if (path_len == 6 && strncmp(target, "/stall", 6) == 0) {
		static const char head[] = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
					   "Content-Length: 1000000\r\n\r\nstart";
		send_all(fd, head, sizeof head - 1);
		for (;;)
			pause();
	} else
		respond(fd, "404 Not Found", "", "not found\n");
	return 1;
}

static int env_true(const char *name)
{
	const char *v = getenv(name);
	return v != NULL && *v != '\0' && strcmp(v, "0") != 0;
}

int main(int argc, char **argv)
{
	int port = 80;
	int once = env_true("HTTP_HELLO_ONCE");

	ensure_std_fds();
	/* PID 1 gets no default signal actions anyway; on the host a dead client must not kill us. */
	signal(SIGPIPE, SIG_IGN);

	/* Unknown arguments are reported and ignored, not fatal: as init, exiting ends the VM, and the
	 * kernel passes any unrecognised command-line word to init as an argument. */
	for (int i = 1; i < argc; i++) {
		char *end;
		if (strcmp(argv[i], "--once") == 0) {
			once = 1;
			continue;
		}
		errno = 0;
		long v = strtol(argv[i], &end, 10);
		if (errno == 0 && end != argv[i] && *end == '\0' && v > 0 && v <= 65535)
			port = (int)v;
		else
			fprintf(stderr, "http-hello: ignoring argument '%s' (usage: http-hello [--once] [PORT])\n",
				argv[i]);
	}

	int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (ls < 0) {
		perror("http-hello: socket");
		return 1;
	}
	int one = 1;
	if (setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
		perror("http-hello: setsockopt SO_REUSEADDR");
	struct sockaddr_in addr = {
		.sin_family = AF_INET,
		.sin_port = htons((unsigned short)port),
		.sin_addr.s_addr = htonl(INADDR_ANY),
	};
	if (bind(ls, (struct sockaddr *)&addr, sizeof addr) < 0) {
		fprintf(stderr, "http-hello: bind 0.0.0.0:%d: %s\n", port, strerror(errno));
		return 1;
	}
	if (listen(ls, 64) < 0) {
		perror("http-hello: listen");
		return 1;
	}

	printf("http-hello: listening on :%d\n", port);
	fflush(stdout);

	for (;;) {
		int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
		if (c < 0) {
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
				usleep(10000); /* resource shortage: back off instead of spinning */
			continue; /* EINTR, ECONNABORTED, EPROTO, ...: never fatal */
		}
		/* The response goes out in one send; don't let Nagle hold the tail of it. */
		setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		int answered = handle(c);
		close_gracefully(c);
		if (once && answered)
			return 0;
	}
}
