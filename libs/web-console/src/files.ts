// The files panel of the session view: the session's workspace as directories (ListFiles with
// prefix and delimiter "/"), with sizes and modification times; uploads into the directory
// shown (one WriteFile call for small files, a chunked upload with progress for big ones) and
// downloads (the DownloadFile stream). The console refreshes it when a turn ends, so what the
// agent wrote shows up.
import { Code } from "../../ts-sdk/src/index.js";
import type { Corral } from "../../ts-sdk/src/index.js";
import type { File } from "../../ts-sdk/src/gen/corral/storage/v1/file_pb.js";
import { $, bytes, describe, el, isCode, save, time } from "./dom.js";
import type { Guard } from "./dom.js";

const PAGE_SIZE = 200;
const KEPT_TRANSFERS = 6;

/** What the panel shows, for tests and debugging. */
export interface FilesDebug {
  workspace: string;
  prefix: string;
  /** Paths of the files listed, then the directories (ending in "/"). */
  listed: string[];
  /** Finished transfers: "upload path", "download path" (or "... failed"). */
  transfers: string[];
}

export class FilesPanel {
  private workspace = "";
  private prefix = "";
  private nextPage = "";
  /** Bumped on every new listing, so an answer to an older one is dropped. */
  private generation = 0;
  private soon: ReturnType<typeof setTimeout> | undefined;
  readonly debug: FilesDebug = { workspace: "", prefix: "", listed: [], transfers: [] };

  constructor(
    private readonly corral: Corral,
    private readonly guard: Guard,
  ) {
    $("files-refresh").addEventListener("click", () => void this.refresh());
    $("files-more").addEventListener("click", () => void this.list(true));
    const input = $<HTMLInputElement>("files-input");
    input.addEventListener("change", () => {
      const chosen = [...(input.files ?? [])];
      input.value = "";
      void this.uploadAll(chosen);
    });
  }

  /** Shows a session's workspace from its root (`workspaces/{id}`; "" for none). */
  show(workspace: string): void {
    this.workspace = workspace;
    this.debug.workspace = workspace;
    $("files-transfers").replaceChildren();
    this.open("");
  }

  /** Lists the directory shown again, from its first page. */
  refresh(): Promise<void> {
    clearTimeout(this.soon);
    return this.list(false);
  }

  /** Refreshes shortly: once for a burst of calls (a session's history replaying its turns). */
  refreshSoon(): void {
    clearTimeout(this.soon);
    this.soon = setTimeout(() => void this.refresh(), 100);
  }

  private open(prefix: string): void {
    this.prefix = prefix;
    this.debug.prefix = prefix;
    this.breadcrumbs();
    void this.list(false);
  }

  private breadcrumbs(): void {
    const parts = this.prefix.split("/").filter(Boolean);
    const crumb = (label: string, prefix: string) => {
      const button = el("button", { type: "button", class: "link", "data-prefix": prefix }, label);
      button.addEventListener("click", () => this.open(prefix));
      return button;
    };
    const trail: (Node | string)[] = [crumb("workspace", "")];
    parts.forEach((part, i) => trail.push(" / ", crumb(part, `${parts.slice(0, i + 1).join("/")}/`)));
    $("files-path").replaceChildren(...trail);
  }

  private async list(more: boolean): Promise<void> {
    const generation = ++this.generation;
    const { workspace, prefix } = this;
    const body = $("files-list");
    const status = $("files-status");
    $<HTMLInputElement>("files-input").disabled = !workspace;
    if (!workspace) {
      body.replaceChildren();
      status.textContent = "Select a session to see its files.";
      $("files-more").hidden = true;
      return;
    }
    const reply = await this.guard(async () => {
      try {
        return await this.corral.storage.listFiles({
          parent: workspace,
          prefix,
          delimiter: "/",
          pageSize: PAGE_SIZE,
          pageToken: more ? this.nextPage : "",
        });
      } catch (error) {
        if (isCode(error, Code.NotFound)) return null; // no workspace (yet)
        throw error;
      }
    });
    if (generation !== this.generation || reply === undefined) return;
    if (reply === null) {
      body.replaceChildren();
      this.debug.listed = [];
      status.textContent = "This session has no workspace.";
      $<HTMLInputElement>("files-input").disabled = true;
      $("files-more").hidden = true;
      return;
    }
    if (!more) {
      body.replaceChildren();
      this.debug.listed = [];
    }
    for (const directory of reply.prefixes) body.append(this.directoryRow(directory));
    for (const file of reply.files) body.append(this.fileRow(file));
    this.debug.listed.push(...reply.files.map((f) => f.path), ...reply.prefixes);
    this.nextPage = reply.nextPageToken;
    $("files-more").hidden = !reply.nextPageToken;
    status.textContent = body.childElementCount === 0 ? (prefix ? "Empty directory." : "No files yet.") : "";
  }

  private directoryRow(prefix: string): HTMLElement {
    const name = prefix.slice(this.prefix.length);
    const open = el("button", { type: "button", class: "link" }, `▸ ${name}`);
    open.addEventListener("click", () => this.open(prefix));
    return el("tr", { class: "directory", "data-prefix": prefix }, el("td", { colspan: "4" }, open));
  }

  private fileRow(file: File): HTMLElement {
    const name = file.path.slice(this.prefix.length);
    const download = el("button", { type: "button", class: "small secondary", title: `Download ${name}` }, "⇩");
    download.addEventListener("click", () => void this.download(file));
    return el(
      "tr",
      { class: "file", "data-path": file.path },
      el("td", { class: "name", title: file.contentType }, name),
      el("td", { class: "size", "data-bytes": String(file.sizeBytes) }, bytes(file.sizeBytes)),
      el("td", { class: "modified" }, time(file.updateTime)),
      el("td", {}, download),
    );
  }

  // ---- transfers ----

  /** A row in the transfers list with a progress bar; returns its progress and end callbacks. */
  private transfer(kind: "upload" | "download", path: string) {
    const bar = el("progress", { max: "1", value: "0" });
    const status = el("span", { class: "status" }, "");
    const row = el("li", { "data-kind": kind, "data-path": path, "data-state": "running" }, el("span", { class: "name" }, `${kind === "upload" ? "⇧" : "⇩"} ${path}`), bar, status);
    const list = $("files-transfers");
    list.prepend(row);
    while (list.childElementCount > KEPT_TRANSFERS) list.lastElementChild?.remove();
    return {
      progress: (done: number, total: number) => {
        bar.max = Math.max(total, 1);
        bar.value = done;
        status.textContent = `${bytes(done)} / ${bytes(total)}`;
      },
      end: (error?: unknown) => {
        row.dataset.state = error === undefined ? "done" : "failed";
        if (error !== undefined) status.textContent = describe(error);
        else bar.value = bar.max;
        this.debug.transfers.push(`${kind} ${path}${error === undefined ? "" : " failed"}`);
      },
    };
  }

  private async uploadAll(chosen: globalThis.File[]): Promise<void> {
    for (const file of chosen) await this.upload(file);
    await this.refresh();
  }

  private async upload(file: globalThis.File): Promise<void> {
    const workspace = this.workspace;
    // Storage takes paths in NFC (a Mac names files in NFD).
    const path = `${this.prefix}${file.name.normalize("NFC")}`;
    const row = this.transfer("upload", path);
    const send = (overwrite: boolean) =>
      this.corral.uploadFile(workspace, path, file, { overwrite, onProgress: row.progress });
    try {
      await send(false);
      row.end();
    } catch (error) {
      if (isCode(error, Code.AlreadyExists) && confirm(`${path} exists. Replace it?`)) {
        try {
          await send(true);
          row.end();
        } catch (again) {
          row.end(again);
        }
      } else {
        row.end(error);
      }
    }
  }

  private async download(file: File): Promise<void> {
    const row = this.transfer("download", file.path);
    try {
      const { blob } = await this.corral.downloadFile(file.name, { onProgress: row.progress });
      save(blob, file.path.split("/").pop() ?? "download");
      row.end();
    } catch (error) {
      row.end(error);
    }
  }
}
