// A loopback TCP proxy a test can cut and restore: a network drop between a client and the edge.
// Used by this package's test and by the web console's browser test.
import net from "node:net";

export class TcpProxy {
  #sockets = new Set();
  #up = true;

  /** @param {string} target the upstream's URL, e.g. http://127.0.0.1:8080 */
  constructor(target) {
    const { hostname, port } = new URL(target);
    this.server = net.createServer((client) => {
      if (!this.#up) {
        client.destroy();
        return;
      }
      const upstream = net.connect(Number(port), hostname);
      for (const [from, to] of [[client, upstream], [upstream, client]]) {
        this.#sockets.add(from);
        from.on("error", () => to.destroy());
        from.on("close", () => {
          this.#sockets.delete(from);
          to.destroy();
        });
        from.pipe(to);
      }
    });
  }

  listen() {
    return new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
  }

  get url() {
    return `http://127.0.0.1:${this.server.address().port}`;
  }

  /** Drop every open connection and refuse new ones. */
  cut() {
    this.#up = false;
    for (const socket of this.#sockets) socket.destroy();
  }

  restore() {
    this.#up = true;
  }

  close() {
    this.cut();
    return new Promise((resolve) => this.server.close(resolve));
  }
}
