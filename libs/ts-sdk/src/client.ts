/**
 * Corral's TypeScript client: typed clients for the public services over grpc-web (binary
 * framing, through Envoy), the bearer token added to every call, and a session event stream
 * that resumes by sequence after a dropped connection.
 *
 * ```ts
 * const corral = createCorral({ baseUrl: "http://localhost:8080", getToken: () => token });
 * const { session } = await corral.session.createSession({ session: { displayName: "demo" } });
 * for await (const event of corral.streamSessionEvents(session!.name, { signal })) { ... }
 * ```
 */
import {
  Code,
  ConnectError,
  createClient,
  createContextKey,
  createContextValues,
} from "@connectrpc/connect";
import type { Client, Interceptor, Transport } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

import { IdentityService } from "./gen/corral/identity/v1/identity_service_pb.js";
import type { SessionEvent } from "./gen/corral/session/v1/event_pb.js";
import { SessionService } from "./gen/corral/session/v1/session_service_pb.js";
import { StorageService } from "./gen/corral/storage/v1/storage_service_pb.js";
import { TaskService } from "./gen/corral/task/v1/task_service_pb.js";
import type { File } from "./gen/corral/storage/v1/file_pb.js";
import { downloadFile, uploadFile } from "./storage.js";
import type { Download, DownloadOptions, UploadOptions } from "./storage.js";

export interface CorralOptions {
  /** The edge (Envoy), e.g. `http://localhost:8080`. */
  baseUrl: string;
  /** A fixed access token. */
  token?: string;
  /** Called before every call: return the current access token (or "" for none). */
  getToken?: () => string | undefined | Promise<string | undefined>;
  /** A fetch implementation (default: the global one). */
  fetch?: typeof globalThis.fetch;
  /** More interceptors, run after the one that adds the token. */
  interceptors?: Interceptor[];
}

/** Where a resumable stream is. */
export type StreamState = "connecting" | "live" | "reconnecting" | "closed";

export interface StreamSessionEventsOptions {
  /** Start after this sequence (0: the whole history). */
  afterSequence?: bigint | number;
  /** Stops the stream (the iterator then ends without an error). */
  signal?: AbortSignal;
  /** Told about every change of state; on "reconnecting", `error` is why the last try failed. */
  onState?: (state: StreamState, error?: ConnectError) => void;
  /** First retry delay (ms), doubled per failure up to `maxBackoffMs`, reset by any message. */
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  /** Also yield heartbeats (never persisted, no sequence of their own). Default: false. */
  heartbeats?: boolean;
}

export interface Corral {
  readonly transport: Transport;
  readonly identity: Client<typeof IdentityService>;
  readonly session: Client<typeof SessionService>;
  readonly task: Client<typeof TaskService>;
  readonly storage: Client<typeof StorageService>;
  /**
   * Every event of `session` after `afterSequence`, then live ones, forever (until `signal`
   * aborts). A dropped connection is retried with backoff from the last sequence seen, so each
   * persisted event is yielded exactly once and in order. Errors that a retry cannot fix
   * (NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED, INVALID_ARGUMENT, ...) end it by throwing.
   */
  streamSessionEvents(
    session: string,
    options?: StreamSessionEventsOptions,
  ): AsyncGenerator<SessionEvent, void, undefined>;
  /**
   * Puts `data` at `path` in `workspace`: one WriteFile call for a small file, else a
   * resumable chunked upload checked by SHA-256 (see storage.ts).
   */
  uploadFile(
    workspace: string,
    path: string,
    data: Blob | Uint8Array,
    options?: UploadOptions,
  ): Promise<File>;
  /** A file's content and metadata over the DownloadFile stream, resumed if it breaks. */
  downloadFile(name: string, options?: DownloadOptions): Promise<Download>;
}

/** Set per stream call: told when the response headers arrive (the server took the stream). */
const STREAM_OPENED = createContextKey<(() => void) | undefined>(undefined, {
  description: "corral: stream opened",
});

const streamOpened: Interceptor = (next) => async (request) => {
  const response = await next(request);
  if (response.stream) {
    request.contextValues.get(STREAM_OPENED)?.();
  }
  return response;
};

/** Codes a reconnect cannot fix. */
const FINAL_CODES: ReadonlySet<Code> = new Set([
  Code.InvalidArgument,
  Code.NotFound,
  Code.PermissionDenied,
  Code.Unauthenticated,
  Code.Unimplemented,
  Code.FailedPrecondition,
]);

export function createCorral(options: CorralOptions): Corral {
  const getToken = options.getToken ?? (() => options.token);
  const authorization: Interceptor = (next) => async (request) => {
    const token = await getToken();
    if (token) {
      request.header.set("authorization", `Bearer ${token}`);
    }
    return next(request);
  };
  const transport = createGrpcWebTransport({
    baseUrl: options.baseUrl,
    useBinaryFormat: true,
    interceptors: [authorization, ...(options.interceptors ?? []), streamOpened],
    fetch: options.fetch,
  });
  const session = createClient(SessionService, transport);

  async function* streamSessionEvents(
    name: string,
    streamOptions: StreamSessionEventsOptions = {},
  ): AsyncGenerator<SessionEvent, void, undefined> {
    const { signal, onState } = streamOptions;
    const initialBackoff = streamOptions.initialBackoffMs ?? 250;
    const maxBackoff = streamOptions.maxBackoffMs ?? 5000;
    let cursor = BigInt(streamOptions.afterSequence ?? 0);
    let backoff = initialBackoff;
    let state: StreamState | undefined;
    const setState = (next: StreamState, error?: ConnectError) => {
      if (next !== state || error !== undefined) {
        state = next;
        onState?.(next, error);
      }
    };
    setState("connecting");
    try {
      while (!signal?.aborted) {
        try {
          const opened = () => {
            setState("live");
            backoff = initialBackoff;
          };
          const stream = session.streamSessionEvents(
            { session: name, afterSequence: cursor },
            { signal, contextValues: createContextValues().set(STREAM_OPENED, opened) },
          );
          for await (const response of stream) {
            setState("live");
            backoff = initialBackoff;
            const event = response.event;
            if (event === undefined) {
              continue;
            }
            if (event.payload.case === "heartbeat") {
              if (streamOptions.heartbeats) {
                yield event;
              }
              continue;
            }
            if (event.sequence <= cursor) {
              continue; // already yielded (a replay overlapping what we saw)
            }
            cursor = event.sequence;
            yield event;
          }
          // The server ended the stream (a restart, a drain): pick up where we are.
          setState("reconnecting");
        } catch (cause) {
          if (signal?.aborted) {
            return;
          }
          const error = ConnectError.from(cause);
          if (error.code === Code.Canceled && signal?.aborted) {
            return;
          }
          if (FINAL_CODES.has(error.code)) {
            throw error;
          }
          setState("reconnecting", error);
        }
        await sleep(jitter(backoff), signal);
        backoff = Math.min(backoff * 2, maxBackoff);
      }
    } finally {
      setState("closed");
    }
  }

  const storage = createClient(StorageService, transport);
  return {
    transport,
    identity: createClient(IdentityService, transport),
    session,
    task: createClient(TaskService, transport),
    storage,
    streamSessionEvents,
    uploadFile: (workspace, path, data, uploadOptions) =>
      uploadFile(storage, workspace, path, data, uploadOptions),
    downloadFile: (name, downloadOptions) => downloadFile(storage, name, downloadOptions),
  };
}

function jitter(ms: number): number {
  return ms / 2 + Math.random() * (ms / 2);
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) {
      resolve();
      return;
    }
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}
