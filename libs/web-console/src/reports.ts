// The reports page: the reports the user may read, filtered by format, title, session and
// label, newest first; one report at a time, shown by its format:
// - Markdown: rendered by `marked`, then sanitised by DOMPurify (no scripts, handlers, styles,
//   forms or frames; links open in a new tab without a referrer; images only from data: URLs,
//   so a report cannot make the browser call anywhere);
// - JSON: pretty-printed and coloured, as text nodes;
// - HTML: only in an <iframe sandbox> with no permissions at all (no scripts, an opaque
//   origin, no forms, popups or top navigation), its document given as srcdoc: never loaded
//   from the API's origin, never able to reach the console or its token;
// - other text: as plain text; anything else: a download.
import DOMPurify from "dompurify";
import { marked } from "marked";

import type { Corral } from "../../ts-sdk/src/index.js";
import { ReportFormat, ReportView } from "../../ts-sdk/src/gen/corral/storage/v1/report_pb.js";
import type { Report } from "../../ts-sdk/src/gen/corral/storage/v1/report_pb.js";
import { $, bytes, el, save, time } from "./dom.js";
import type { Guard } from "./dom.js";

const PAGE_SIZE = 50;

/** What the page shows, for tests and debugging. */
export interface ReportsDebug {
  filter: string;
  listed: string[];
  shown: string;
}

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node instanceof HTMLAnchorElement) {
    node.target = "_blank";
    node.rel = "noopener noreferrer nofollow";
  }
  if (node instanceof HTMLImageElement) {
    const source = node.getAttribute("src") ?? "";
    if (!source.startsWith("data:image/")) {
      node.removeAttribute("src");
      node.removeAttribute("srcset");
      node.title = `not loaded: ${source}`;
    }
  }
});

/** Markdown as a sanitised fragment (never a string of markup put back into the page). */
export function renderMarkdown(text: string): DocumentFragment {
  const html = marked.parse(text, { async: false, gfm: true });
  return DOMPurify.sanitize(html, {
    USE_PROFILES: { html: true },
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "frame"],
    FORBID_ATTR: ["style", "srcset"],
    RETURN_DOM_FRAGMENT: true,
  });
}

/** JSON pretty-printed, its tokens in spans (text nodes only). */
export function renderJson(text: string): HTMLElement {
  let pretty: string;
  try {
    pretty = JSON.stringify(JSON.parse(text), null, 2);
  } catch (error) {
    return el("div", {}, el("p", { class: "error" }, `Not valid JSON: ${String(error)}`), el("pre", {}, text));
  }
  const code = el("code", {});
  const token = /("(?:[^"\\]|\\.)*")(\s*:)?|\b(true|false|null)\b|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)/g;
  let last = 0;
  for (const match of pretty.matchAll(token)) {
    code.append(pretty.slice(last, match.index));
    const [whole, string, colon, literal, number] = match;
    if (string !== undefined) {
      code.append(el("span", { class: colon ? "json-key" : "json-string" }, string));
      if (colon) code.append(colon);
    } else if (literal !== undefined) {
      code.append(el("span", { class: "json-literal" }, literal));
    } else if (number !== undefined) {
      code.append(el("span", { class: "json-number" }, number));
    }
    last = (match.index ?? 0) + whole.length;
  }
  code.append(pretty.slice(last));
  return el("pre", { class: "json" }, code);
}

/** An HTML document in a frame with every sandbox restriction (the attribute, empty). */
export function renderHtml(text: string, title: string): HTMLIFrameElement {
  const frame = el("iframe", {
    id: "report-frame",
    sandbox: "",
    referrerpolicy: "no-referrer",
    title,
  });
  frame.srcdoc = text;
  return frame;
}

export function formatName(format: ReportFormat): string {
  return format === ReportFormat.UNSPECIFIED ? "other" : (ReportFormat[format] ?? "other").toLowerCase();
}

function quoted(value: string): string {
  return `"${value.replace(/"/g, '\\"')}"`;
}

export class ReportsPage {
  private nextPage = "";
  private filter = "";
  private generation = 0;
  readonly debug: ReportsDebug = { filter: "", listed: [], shown: "" };

  constructor(
    private readonly corral: Corral,
    private readonly guard: Guard,
    /** Opens a session in the session view. */
    private readonly openSession: (name: string) => void,
  ) {
    $("report-filters").addEventListener("submit", (e) => (e.preventDefault(), void this.list(false)));
    $("report-filters").addEventListener("reset", () => setTimeout(() => void this.list(false)));
    $("reports-more").addEventListener("click", () => void this.list(true));
  }

  /** The filter the form describes, in the API's syntax (protos/README.md). */
  private filterFromForm(): string {
    const value = (id: string) => $<HTMLInputElement>(id).value.trim();
    const parts: string[] = [];
    const format = value("report-filter-format");
    if (format) parts.push(`format = ${format}`);
    const title = value("report-filter-title");
    if (title) parts.push(`title = ${quoted(`${title}*`)}`);
    const session = value("report-filter-session");
    if (session) parts.push(`session = ${quoted(session.startsWith("sessions/") ? session : `sessions/${session}`)}`);
    const label = value("report-filter-label");
    if (label) {
      const [key, ...rest] = label.split("=");
      parts.push(`labels.${key.trim()} = ${quoted(rest.join("=").trim())}`);
    }
    return parts.join(" AND ");
  }

  /** Lists the reports the filters select; with `more`, the next page. */
  async list(more: boolean): Promise<void> {
    const generation = ++this.generation;
    if (!more) this.filter = this.filterFromForm();
    this.debug.filter = this.filter;
    const reply = await this.guard(() =>
      this.corral.storage.listReports({
        pageSize: PAGE_SIZE,
        filter: this.filter,
        pageToken: more ? this.nextPage : "",
      }),
    );
    if (reply === undefined || generation !== this.generation) return;
    const list = $("reports");
    if (!more) {
      list.replaceChildren();
      this.debug.listed = [];
    }
    for (const report of reply.reports) list.append(this.row(report));
    this.debug.listed.push(...reply.reports.map((r) => r.name));
    this.nextPage = reply.nextPageToken;
    $("reports-more").hidden = !reply.nextPageToken;
    if (list.childElementCount === 0) list.append(el("li", { class: "muted" }, "No reports."));
  }

  private row(report: Report): HTMLElement {
    const format = formatName(report.format);
    const item = el(
      "li",
      { "data-name": report.name, "data-format": format },
      el("span", { class: "title" }, report.title),
      el("span", { class: `badge format-${format}` }, format),
      el("span", { class: "muted meta" }, bytes(report.sizeBytes), " · ", time(report.createTime)),
    );
    item.classList.toggle("selected", report.name === this.debug.shown);
    item.addEventListener("click", () => (location.hash = `#${report.name}`));
    return item;
  }

  /** Shows one report (`reports/{id}`), content and all. */
  async show(name: string): Promise<void> {
    this.debug.shown = name;
    for (const item of $("reports").querySelectorAll<HTMLElement>("li")) {
      item.classList.toggle("selected", item.dataset.name === name);
    }
    const reply = await this.guard(() =>
      this.corral.storage.getReport({ name, view: ReportView.FULL }),
    );
    const report = reply?.report;
    if (report === undefined || this.debug.shown !== name) return;
    $("report-title").textContent = report.title;
    $("report-meta").replaceChildren(...this.meta(report));
    const body = $("report-body");
    body.dataset.format = formatName(report.format);
    body.replaceChildren(this.render(report));
    const download = $<HTMLButtonElement>("report-download");
    download.hidden = false;
    download.onclick = () => save(new Blob([report.content as Uint8Array<ArrayBuffer>], { type: report.contentType }), this.filename(report));
  }

  private render(report: Report): Node {
    const text = () => new TextDecoder().decode(report.content);
    switch (report.format) {
      case ReportFormat.MARKDOWN:
        return el("div", { class: "markdown" }, renderMarkdown(text()));
      case ReportFormat.JSON:
        return renderJson(text());
      case ReportFormat.HTML:
        return renderHtml(text(), report.title);
      default:
        if (/^text\/|\+json|\/json|\+xml|\/xml/.test(report.contentType)) {
          return el("pre", {}, text());
        }
        return el("p", { class: "muted" }, `${report.contentType}, ${bytes(report.sizeBytes)}: download it to open it.`);
    }
  }

  private meta(report: Report): Node[] {
    const rows: [string, Node | string][] = [
      ["format", formatName(report.format)],
      ["content type", report.contentType],
      ["size", bytes(report.sizeBytes)],
      ["created", time(report.createTime)],
      ["by", report.creator],
    ];
    if (report.session) {
      const open = el("button", { type: "button", class: "link" }, report.session);
      open.addEventListener("click", () => this.openSession(report.session));
      rows.push(["session", open]);
    }
    if (report.taskRun) rows.push(["task run", report.taskRun]);
    const labels = Object.entries(report.labels);
    if (labels.length) rows.push(["labels", labels.map(([k, v]) => `${k}=${v}`).join(", ")]);
    return rows.flatMap(([key, value]) => [el("dt", {}, key), el("dd", {}, value)]);
  }

  private filename(report: Report): string {
    const base = report.title.replace(/[^\w.-]+/g, "-").replace(/^-+|-+$/g, "") || "report";
    const extension = { [ReportFormat.MARKDOWN]: ".md", [ReportFormat.JSON]: ".json", [ReportFormat.HTML]: ".html" }[
      report.format as number
    ];
    return base + (extension ?? "");
  }
}
