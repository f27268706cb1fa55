// latproxy: a TCP proxy that adds a fixed one-way delay to every byte in both directions,
// standing in for the `tc netem delay` this kernel lacks.
//
// Each direction of each connection is a reader that stamps every chunk it receives and a
// writer that sends the chunk when its stamp plus the delay has passed. The queue between them
// is deep, so the delay never limits throughput (a bandwidth-delay product of a few MB fits):
// like a long wire, not like a slow one. Bandwidth caps are left to `tc tbf`.
package main

import (
	"flag"

	"log"
	"net"
	"time"
)

type chunk struct {
	data []byte
	due  time.Time
}

func pipe(dst, src net.Conn, delay time.Duration) {
	queue := make(chan chunk, 4096)
	go func() {
		defer close(queue)
		for {
			buf := make([]byte, 64<<10)
			n, err := src.Read(buf)
			if n > 0 {
				queue <- chunk{buf[:n], time.Now().Add(delay)}
			}
			if err != nil {
				return
			}
		}
	}()
	for c := range queue {
		if wait := time.Until(c.due); wait > 0 {
			time.Sleep(wait)
		}
		if _, err := dst.Write(c.data); err != nil {
			break
		}
	}
	// Drain so the reader goroutine can finish, then pass the half-close on.
	for range queue {
	}
	if tcp, ok := dst.(*net.TCPConn); ok {
		tcp.CloseWrite()
	} else {
		dst.Close()
	}
}

func serve(client net.Conn, upstream string, delay time.Duration) {
	server, err := net.Dial("tcp", upstream)
	if err != nil {
		log.Printf("dial %s: %v", upstream, err)
		client.Close()
		return
	}
	for _, c := range []net.Conn{client, server} {
		c.(*net.TCPConn).SetNoDelay(true)
	}
	done := make(chan struct{}, 2)
	go func() { pipe(server, client, delay); done <- struct{}{} }()
	go func() { pipe(client, server, delay); done <- struct{}{} }()
	<-done
	<-done
	client.Close()
	server.Close()
}

func main() {
	listen := flag.String("listen", "127.0.0.1:9001", "address to accept connections on")
	upstream := flag.String("upstream", "", "address to forward to")
	rtt := flag.Duration("rtt", 10*time.Millisecond, "added round-trip time (half each way)")
	flag.Parse()
	if *upstream == "" {
		log.Fatal("-upstream is required")
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("latproxy %s -> %s, +%s RTT", *listen, *upstream, *rtt)
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			log.Fatal(err)
		}
		go serve(conn, *upstream, *rtt/2)
	}
}
