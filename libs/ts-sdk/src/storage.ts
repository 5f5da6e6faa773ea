/**
 * File transfers with the storage service over grpc-web, for browsers and Node alike.
 *
 * - `uploadFile`: small files in one `WriteFile` call; bigger ones as a resumable chunked upload
 *   (`CreateUpload`, `AppendUploadChunk` per chunk, `CommitUpload` with the SHA-256 computed by
 *   WebCrypto). A chunk that fails on the way (a dropped connection, an overloaded server) is
 *   retried from the offset the server says it has; anything else aborts the upload and throws.
 * - `downloadFile`: the `DownloadFile` server stream; a stream broken mid-file resumes from the
 *   bytes received (`offset` + `if_sha256`), and the result is checked against the file's
 *   SHA-256.
 *
 * WebCrypto (`crypto.subtle`) exists in Node 20+ and in browsers on secure origins (HTTPS, or
 * `localhost` / `127.0.0.1`). It hashes a whole buffer at once, so an upload holds the file in
 * memory once (its chunks are views of that buffer, not copies).
 */
import { Code, ConnectError } from "@connectrpc/connect";
import type { Client } from "@connectrpc/connect";

import type { File } from "./gen/corral/storage/v1/file_pb.js";
import type { StorageService } from "./gen/corral/storage/v1/storage_service_pb.js";
import { Upload_State } from "./gen/corral/storage/v1/upload_pb.js";

export type StorageClient = Client<typeof StorageService>;

/** WriteFile's limit, and the largest chunk AppendUploadChunk takes (storage_service.proto). */
export const MAX_WRITE_BYTES = 4 * 1024 * 1024;
export const MAX_CHUNK_BYTES = 2 * 1024 * 1024;

/** Told how many bytes have gone (or come) so far, of how many. */
export type Progress = (done: number, total: number) => void;

export interface UploadOptions {
  /** The media type; default: the Blob's type, else the server guesses from the path. */
  contentType?: string;
  /** Replace a file already at the path (default false: ALREADY_EXISTS, FILE_EXISTS). */
  overwrite?: boolean;
  /** Files up to this many bytes go in one WriteFile call (default 1 MiB, at most 4 MiB). */
  singleCallLimit?: number;
  /** Chunk size of a chunked upload (default 1 MiB, at most 2 MiB). */
  chunkSize?: number;
  /** Retries of one chunk after transient failures (default 5). */
  retries?: number;
  /** First retry delay in ms, doubled per failure (default 200). */
  backoffMs?: number;
  onProgress?: Progress;
  /** Stops the upload: a chunked one is aborted on the server, and the call throws. */
  signal?: AbortSignal;
}

export interface DownloadOptions {
  /** Reconnects after a broken stream (default 5), resuming from the bytes received. */
  retries?: number;
  /** First retry delay in ms, doubled per failure (default 200). */
  backoffMs?: number;
  /** Check the bytes against the file's SHA-256 (default true). */
  verify?: boolean;
  onProgress?: Progress;
  signal?: AbortSignal;
}

export interface Download {
  /** The file's metadata, as the first message of the stream had it. */
  file: File;
  /** The content, typed with the file's content type. */
  blob: Blob;
}

/** Codes after which the same call may well succeed: retried. */
const TRANSIENT: ReadonlySet<Code> = new Set([
  Code.Unavailable,
  Code.DeadlineExceeded,
  Code.Aborted, // UPLOAD_BUSY: another append to the same upload is still being written
  Code.Unknown, // a connection dropped mid-response (no status arrived)
]);

/** The lowercase hex SHA-256 of data (WebCrypto). */
export async function sha256Hex(data: Uint8Array | ArrayBuffer): Promise<string> {
  const view = data instanceof Uint8Array ? data : new Uint8Array(data);
  // Uint8Array<ArrayBufferLike> is not a BufferSource to TypeScript (SharedArrayBuffer).
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", view as BufferSource));
  return Array.from(digest, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/**
 * Puts `data` at `path` in `workspace` (`workspaces/{id}`) and returns the file written.
 * Errors are the storage service's (ConnectError): NOT_FOUND for a workspace the caller cannot
 * see, PERMISSION_DENIED for a reader, ALREADY_EXISTS without `overwrite`, RESOURCE_EXHAUSTED
 * over quota, and so on; a chunked upload that fails is aborted first.
 */
export async function uploadFile(
  storage: StorageClient,
  workspace: string,
  path: string,
  data: Blob | Uint8Array,
  options: UploadOptions = {},
): Promise<File> {
  const { signal, onProgress } = options;
  const contentType = options.contentType ?? (data instanceof Blob ? data.type : "");
  const overwrite = options.overwrite ?? false;
  const singleCallLimit = Math.min(options.singleCallLimit ?? 1024 * 1024, MAX_WRITE_BYTES);
  signal?.throwIfAborted();
  const bytes = data instanceof Blob ? new Uint8Array(await data.arrayBuffer()) : data;
  const total = bytes.length;
  if (total <= singleCallLimit) {
    onProgress?.(0, total);
    const reply = await storage.writeFile(
      { parent: workspace, path, data: bytes, contentType, overwrite },
      { signal },
    );
    onProgress?.(total, total);
    return required(reply.file, "WriteFile");
  }

  const chunkSize = clamp(options.chunkSize ?? 1024 * 1024, 1, MAX_CHUNK_BYTES);
  const sha256 = await sha256Hex(bytes);
  signal?.throwIfAborted();
  const created = await storage.createUpload(
    {
      parent: workspace,
      upload: { path, sizeBytes: BigInt(total), contentType, overwrite },
      requestId: crypto.randomUUID(),
    },
    { signal },
  );
  const upload = required(created.upload, "CreateUpload").name;
  try {
    let offset = 0;
    onProgress?.(0, total);
    while (offset < total) {
      const chunk = bytes.subarray(offset, Math.min(offset + chunkSize, total));
      offset = await retrying(options, async () => {
        try {
          const reply = await storage.appendUploadChunk(
            { name: upload, offset: BigInt(offset), data: chunk },
            { signal },
          );
          return Number(reply.committedBytes);
        } catch (error) {
          // The server may have kept the chunk although the answer was lost (a retry is then
          // OFFSET_MISMATCH, FAILED_PRECONDITION): it says where it is, and the next chunk
          // starts there.
          const code = ConnectError.from(error).code;
          if (isTransient(error) || code === Code.FailedPrecondition) {
            const { upload: now } = await storage.getUpload({ name: upload }, { signal });
            const committed = Number(now?.committedBytes ?? offset);
            if (now?.state === Upload_State.ACTIVE && committed !== offset) return committed;
          }
          throw error;
        }
      });
      onProgress?.(offset, total);
    }
    const reply = await retrying(options, () =>
      storage.commitUpload({ name: upload, sha256 }, { signal }),
    );
    return required(reply.file, "CommitUpload");
  } catch (error) {
    // Give the quota hold back now rather than when the upload expires.
    await storage.abortUpload({ name: upload }).catch(() => undefined);
    throw error;
  }
}

/**
 * Reads the file `name` (`workspaces/{w}/files/{f}`, from ListFiles) in full. A stream broken
 * mid-file is reopened at the bytes received, pinned to the same content (`if_sha256`: a file
 * changed in between fails ABORTED, FILE_CHANGED, rather than mixing two versions).
 */
export async function downloadFile(
  storage: StorageClient,
  name: string,
  options: DownloadOptions = {},
): Promise<Download> {
  const { signal, onProgress } = options;
  const parts: Uint8Array<ArrayBuffer>[] = [];
  let file: File | undefined;
  let received = 0;
  await retrying(options, async () => {
    const stream = storage.downloadFile(
      { name, offset: BigInt(received), ifSha256: file?.sha256 ?? "" },
      { signal },
    );
    for await (const message of stream) {
      if (message.file !== undefined && file === undefined) {
        file = message.file;
        onProgress?.(received, Number(file.sizeBytes));
      }
      if (Number(message.offset) !== received) {
        throw new ConnectError(`chunk at ${message.offset}, expected ${received}`, Code.DataLoss);
      }
      if (message.data.length > 0) {
        parts.push(message.data as Uint8Array<ArrayBuffer>);
        received += message.data.length;
        onProgress?.(received, Number(file?.sizeBytes ?? received));
      }
    }
  });
  const found = required(file, "DownloadFile");
  const blob = new Blob(parts, { type: found.contentType });
  if (received !== Number(found.sizeBytes)) {
    throw new ConnectError(`got ${received} of ${found.sizeBytes} bytes`, Code.DataLoss);
  }
  if ((options.verify ?? true) && found.sha256) {
    const actual = await sha256Hex(await blob.arrayBuffer());
    if (actual !== found.sha256) {
      throw new ConnectError(`sha256 ${actual}, expected ${found.sha256}`, Code.DataLoss);
    }
  }
  return { file: found, blob };
}

function isTransient(error: unknown): boolean {
  return TRANSIENT.has(ConnectError.from(error).code);
}

async function retrying<T>(
  options: { retries?: number; backoffMs?: number; signal?: AbortSignal },
  call: () => Promise<T>,
): Promise<T> {
  const retries = options.retries ?? 5;
  let delay = options.backoffMs ?? 200;
  for (let attempt = 0; ; attempt++) {
    try {
      return await call();
    } catch (error) {
      if (options.signal?.aborted || attempt >= retries || !isTransient(error)) throw error;
    }
    await pause(delay, options.signal);
    delay *= 2;
  }
}

function pause(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
    function done(): void {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
  });
}

function clamp(value: number, low: number, high: number): number {
  return Math.max(low, Math.min(high, Math.floor(value)));
}

function required<T>(value: T | undefined, call: string): T {
  if (value === undefined) throw new ConnectError(`${call} answered no resource`, Code.Internal);
  return value;
}
